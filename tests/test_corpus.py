"""Corpus builder: cleaning functions, the seeded document split, the tokenizer, an offline build."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxmoe import corpus
from jaxmoe.corpus import (
    EOS_TOKEN,
    PAD_TOKEN,
    Source,
    clean_document,
    filter_documents,
    html_to_text,
    load_tokenizer,
    normalize_text,
    pod_to_text,
    rst_to_text,
    split_documents,
    split_of,
    train_tokenizer,
)
from sim.io import InputError

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- cleaning

def test_html_drops_boilerplate_and_keeps_pre():
    html = """<html><head><title>T</title><style>p {color: red}</style></head><body>
    <div class="navheader"><a href="x">Prev</a> <div>inner nav</div> still nav</div>
    <script>var x = "<p>not text</p>";</script>
    <h1>Chapter&nbsp;1 &amp; more</h1>
    <p>Some   text
       spread over
    lines.</p>
    <ul><li>one<li>two</ul>
    <pre>  indented
    code()</pre>
    <div class="navfooter">Next</div><p>After.</p></body></html>"""
    text = normalize_text(html_to_text(html))
    assert text == ("Chapter 1 & more\n\nSome text spread over lines.\n\n- one\n- two\n\n"
                    "  indented\n    code()\n\nAfter.")


def test_html_skip_ends_at_matching_close_tag():
    # a skipped <nav> holding another <nav> ends only at the outer </nav>
    html = "<p>a</p><nav><nav>x</nav>y</nav><p>b</p>"
    assert normalize_text(html_to_text(html)) == "a\n\nb"


def test_pod_formatting_codes_and_directives():
    pod = ("=head1 NAME\n\nperlfoo - B<bold C<code>> and C<< $a <=> $b >>, "
           "see L<the docs|perlfunc/open> or L<perlsec>; 1 E<lt> 2 E<gt> 0X<index>.\n\n"
           "=over 4\n\n=item * first\n\n=back\n\n=begin html\n\n<b>raw</b>\n\n=end html\n\n"
           "    verbatim C<kept>\n\n=cut\n")
    assert pod_to_text(pod) == ("NAME\n\nperlfoo - bold code and $a <=> $b, see the docs or "
                                "perlsec; 1 < 2 > 0.\n\n- first\n\n    verbatim C<kept>")


def test_rst_roles_unwrapped():
    assert rst_to_text("See :func:`os.open` and :py:meth:`~a.b` but ``x:y:`z```.") == \
        "See `os.open` and `~a.b` but ``x:y:`z```."


def test_normalize_text():
    raw = "\ufeffA\r\nb  \r\n\n\n\n c\x00\x07\tz<|endoftext|>e\u0301<|pad|>\n\n"
    assert normalize_text(raw) == "A\nb\n\n c\tz\u00e9"


def test_clean_document_rejects_unknown_kind():
    with pytest.raises(ValueError):
        clean_document("pdf", "x")


def test_filter_documents_drops_tiny_tables_and_duplicates():
    prose = "Words that make up a document of reasonable length. " * 20
    table = "0x01, 0x02, 0x03, 0x04,\n" * 40
    docs = [("b/dup", prose), ("a/orig", prose), ("c/tiny", "short"), ("d/table", table),
            ("e/other", prose + " More.")]
    kept, dropped = filter_documents(docs, min_chars=100)
    assert [d for d, _ in kept] == ["a/orig", "e/other"]  # first of the duplicates in id order
    assert dropped == {"tiny": 1, "low_text": 1, "duplicate": 1}


# ---------------------------------------------------------------- split

def _reference_split(doc_id: str, seed: int) -> str:
    """The documented rule, written out independently: sha256 → u in [0, 1) → 0.90 / 0.05 / 0.05."""
    u = int(hashlib.sha256(f"{seed}\0{doc_id}".encode()).hexdigest()[:16], 16) / 2**64
    return "train" if u < 0.90 else "calib" if u < 0.95 else "eval"


@settings(max_examples=200, deadline=None)
@given(doc_id=st.text(min_size=1, max_size=60), seed=st.integers(0, 2**31))
def test_split_matches_documented_rule(doc_id, seed):
    assert split_of(doc_id, seed) == _reference_split(doc_id, seed) == split_of(doc_id, seed)


def test_split_fractions_and_partition():
    ids = [f"pkg/doc{i}.html" for i in range(20000)]
    docs = [(i, f"text of {i}") for i in ids]
    groups = split_documents(docs, seed=7)
    seen = [d for name in groups for d, _ in groups[name]]
    assert sorted(seen) == sorted(ids)  # every document in exactly one split
    n = len(ids)
    # binomial standard deviations: 0.0021 (train), 0.0015 (calib, eval); bounds are ~5 sd
    assert abs(len(groups["train"]) / n - 0.90) < 0.01
    assert abs(len(groups["calib"]) / n - 0.05) < 0.008
    assert abs(len(groups["eval"]) / n - 0.05) < 0.008
    # same ids, other input order → same groups in the same order
    again = split_documents(list(reversed(docs)), seed=7)
    assert again == groups
    # another seed moves documents
    other = split_documents(docs, seed=8)
    assert {d for d, _ in other["eval"]} != {d for d, _ in groups["eval"]}


# ---------------------------------------------------------------- tokenizer

@pytest.fixture(scope="module")
def committed_tokenizer():
    return load_tokenizer(corpus.TOKENIZER_PATH)


def test_committed_tokenizer_vocab_and_specials(committed_tokenizer):
    tok = committed_tokenizer
    assert tok.get_vocab_size() == corpus.VOCAB_SIZE
    assert tok.token_to_id(EOS_TOKEN) == 0 and tok.token_to_id(PAD_TOKEN) == 1
    meta_path = ROOT / "data" / "corpus" / "meta.json"
    if meta_path.exists():  # a built corpus must have been made with this very tokenizer
        meta = json.loads(meta_path.read_text())
        assert meta["tokenizer"]["vocab_size"] == tok.get_vocab_size()
        assert meta["tokenizer"]["sha256"] == corpus.sha256_file(corpus.TOKENIZER_PATH)


SAMPLES = [
    "The amcheck module provides functions that allow you to verify the logical consistency.",
    "def f(x):\n    return {'a': [1, 2.5e-3]}  # comment\n\n\tTabbed line\n",
    "Unicode: naïve café — “quotes” 日本語 😀 Ελληνικά\u00a0nbsp",
    "   leading spaces, trailing spaces   \n\n\n",
    "",
]


@pytest.mark.parametrize("text", SAMPLES)
def test_tokenizer_round_trip_samples(committed_tokenizer, text):
    tok = committed_tokenizer
    ids = tok.encode(text, add_special_tokens=False).ids
    assert all(0 <= i < tok.get_vocab_size() for i in ids)
    assert tok.decode(ids, skip_special_tokens=False) == text


@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=200))
def test_tokenizer_round_trip_any_text(committed_tokenizer, text):
    ids = committed_tokenizer.encode(text, add_special_tokens=False).ids
    assert committed_tokenizer.decode(ids, skip_special_tokens=False) == text


def test_tokenizer_compresses_english(committed_tokenizer):
    # the trained merges matter: English prose is several bytes per token, not ~1
    text = SAMPLES[0] * 5
    n = len(committed_tokenizer.encode(text, add_special_tokens=False).ids)
    assert len(text.encode()) / n > 3.0


def test_training_is_deterministic():
    texts = [f"document {i}: the quick brown fox jumps over the lazy dog {i % 7} times." * 3
             for i in range(200)]
    a = train_tokenizer(texts, 400)
    b = train_tokenizer(list(texts), 400)
    assert a.get_vocab_size() == 400
    assert a.to_str() == b.to_str()
    assert a.token_to_id(EOS_TOKEN) == 0 and a.token_to_id(PAD_TOKEN) == 1


def test_load_tokenizer_bad_file(tmp_path):
    bad = tmp_path / "tok.json"
    bad.write_text("{not json")
    with pytest.raises(InputError, match="tok.json"):
        load_tokenizer(bad)
    with pytest.raises(InputError, match="not found"):
        load_tokenizer(tmp_path / "missing.json")


# ---------------------------------------------------------------- offline end-to-end build

PROSE = ("<p>Paragraph {i} of page {j}: the copy engine moves experts over the link while the "
         "compute stream runs the layer; misses stall it.</p>\n")


def _make_deb(tmp: Path, package: str, files: dict[str, str]) -> Path:
    """A real .deb built with dpkg-deb from the given files (path inside package → text)."""
    root = tmp / f"{package}-root"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        f"Package: {package}\nVersion: 1.0-1\nArchitecture: all\nMaintainer: t <t@example.org>\n"
        "Description: test\n")
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    cache = tmp / "debs"
    cache.mkdir(exist_ok=True)
    deb = cache / f"{package}_1.0-1_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(root), str(deb)],
                   check=True, capture_output=True)
    return deb


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb (Debian)")
def test_build_offline_end_to_end(tmp_path):
    pages = {f"usr/share/doc/t/p{j}.html": "".join(PROSE.format(i=i, j=j) for i in range(8))
             for j in range(60)}
    pages["usr/share/doc/t/dup.html"] = pages["usr/share/doc/t/p0.html"]
    pages["usr/share/doc/t/tiny.html"] = "<p>tiny</p>"
    pods = {f"usr/share/pod/m{j}.pod": f"=head1 NAME\n\nm{j} - C<module> number {j}\n\n"
            + "Text about B<things> that matter for the test. " * 12 for j in range(40)}
    deb_html = _make_deb(tmp_path, "t-html", pages)
    deb_pod = _make_deb(tmp_path, "t-pod", pods)
    sources = (Source("t-html", "1.0-1", corpus.sha256_file(deb_html), "html",
                      ("usr/share/doc/t/*.html",)),
               Source("t-pod", "1.0-1", corpus.sha256_file(deb_pod), "pod", ("usr/share/pod/*.pod",)))
    tok_path = tmp_path / "tok.json"
    out = tmp_path / "out"
    meta = corpus.build(out, tmp_path / "debs", tok_path, retrain=True, any_version=False,
                        seed=3, vocab_size=600, sources=sources)

    assert meta["cleaning"]["dropped"] == {"tiny": 1, "low_text": 0, "duplicate": 1}
    assert meta["cleaning"]["documents"] == 100
    # a corpus this small runs out of pairs seen twice before 600 ids: meta states the real size
    assert 258 < meta["tokenizer"]["vocab_size"] == load_tokenizer(tok_path).get_vocab_size() <= 600
    assert [s["sha256"] for s in meta["sources"]] == [corpus.sha256_file(deb_html),
                                                      corpus.sha256_file(deb_pod)]
    tok = load_tokenizer(tok_path)
    eos = meta["tokenizer"]["eos_id"]
    rows = [line.split("\t") for line in (out / "documents.tsv").read_text().splitlines()[1:]]
    assert len({r[0] for r in rows}) == len(rows) == 100  # no document in two splits
    total_docs = 0
    for name, s in meta["splits"].items():
        arr = np.fromfile(out / s["file"], dtype="<u2")
        assert arr.size == s["tokens"] and arr.nbytes == s["bytes"]
        assert hashlib.sha256(arr.tobytes()).hexdigest() == s["sha256"]
        assert int((arr == eos).sum()) == s["documents"] == s["eos_tokens"]
        total_docs += s["documents"]
        if s["documents"]:
            assert arr[-1] == eos
        # each EOS-ended segment decodes to the cleaned text of the next document of this split
        ids_here = [r[0] for r in rows if r[1] == name]
        assert [split_of(d, 3) for d in ids_here] == [name] * len(ids_here)
        segments = np.split(arr, np.flatnonzero(arr == eos) + 1)[:-1]
        assert len(segments) == len(ids_here)
        for doc_id, seg in zip(ids_here, segments):
            package, rel = doc_id.split("/", 1)
            kind, raw = ("html", pages[rel]) if package == "t-html" else ("pod", pods[rel])
            assert tok.decode(seg[:-1].tolist(), skip_special_tokens=False) == clean_document(kind, raw)
    assert total_docs == 100

    # same inputs and seed, reusing the tokenizer → byte-identical outputs
    out2 = tmp_path / "out2"
    meta2 = corpus.build(out2, tmp_path / "debs", tok_path, retrain=False, any_version=False,
                         seed=3, vocab_size=600, sources=sources)
    assert meta2["splits"] == meta["splits"]
    assert (out2 / "meta.json").read_text() == (out / "meta.json").read_text()


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb (Debian)")
def test_build_rejects_deb_with_wrong_sha(tmp_path):
    deb = _make_deb(tmp_path, "t-html", {"usr/share/doc/t/a.html": PROSE.format(i=0, j=0) * 9})
    src = Source("t-html", "1.0-1", "0" * 64, "html", ("usr/share/doc/t/*.html",))
    with pytest.raises(InputError, match="differs from the pinned"):
        corpus.build(tmp_path / "out", deb.parent, corpus.TOKENIZER_PATH, retrain=False,
                     any_version=False, seed=1, vocab_size=600, sources=(src,))
    assert not (tmp_path / "out").exists()


def test_cli_bad_vocab_size_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        corpus.main(["--out", str(tmp_path / "o"), "--vocab-size", "10"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--vocab-size" in err[0]
    assert not (tmp_path / "o").exists()
