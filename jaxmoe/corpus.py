"""Offline real-text corpus and byte-level BPE tokenizer for the project's small Qwen3-MoE model.

No data set can be downloaded here, but Debian's package archive can: its documentation packages
hold tens of megabytes of human-written English prose (manuals, guides, references), and its
Python packages hold the standard library's source (code with docstrings and comments).

Pipeline (`python -m jaxmoe.corpus --out data/corpus`):

1. Fetch: `apt-get download PACKAGE=VERSION` for each pinned package in `SOURCES` into a cache
   folder; each .deb's sha256 is checked against the pinned one (`--any-version` takes the
   archive's current candidate instead and only records what it got).
2. Extract with `dpkg-deb -x` into a temporary folder; select files by glob per package.
3. Clean each file into one document (`clean_document`): HTML → text (scripts, styles, heads and
   navigation/menu/table-of-contents blocks dropped, `<pre>` kept verbatim, other whitespace
   collapsed), POD → text (formatting codes unwrapped, directives turned into headings/bullets),
   reStructuredText roles unwrapped, code kept as is; then Unicode NFC, LF line ends, no control
   characters, no trailing blanks, at most one empty line in a row, and the tokenizer's special
   token strings removed. Documents shorter than `MIN_DOC_CHARS` and exact duplicates (same
   cleaned text; the first in document-id order is kept) are dropped.
4. Split by document: u = first 8 bytes of sha256(f"{seed}\\0{doc_id}") / 2**64; train if
   u < 0.90, calibration if u < 0.95, else evaluation. Within a split, documents are ordered by a
   second seeded hash (a deterministic shuffle).
5. Tokenize with a byte-level BPE tokenizer (Sennrich et al., "Neural Machine Translation of Rare
   Words with Subword Units", ACL 2016, arXiv:1508.07909; byte-level alphabet and pre-split regex
   of GPT-2, Radford et al. 2019). The committed `jaxmoe/tokenizer.json` is reused unless
   `--retrain-tokenizer` is given, which trains one with the `tokenizers` package on the train
   split only (so calibration and evaluation text is unseen by it too).
6. Write `{train,calib,eval}.bin` (uint16 little-endian token ids; every document is followed by
   the end-of-text id), `documents.tsv` (id, split, chars, tokens) and `meta.json` (sources with
   versions and sha256, counts, special ids, sha256 of each .bin). Same packages + seed → the same
   bytes.
"""
from __future__ import annotations

import argparse
import fnmatch
import gzip
import hashlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import numpy as np

from sim.io import InputError, atomic_path, exit_on_input_error, write_text_atomic

TOKENIZER_PATH = Path(__file__).resolve().parent / "tokenizer.json"
VOCAB_SIZE = 8192  # total ids, specials and the 256 byte symbols included
EOS_TOKEN = "<|endoftext|>"  # id 0: ends every document in the .bin files
PAD_TOKEN = "<|pad|>"  # id 1: never written to the corpus; for batching
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN)
MIN_DOC_CHARS = 400  # documents shorter than this after cleaning are dropped
MIN_WORD_FRACTION = 0.30  # documents with fewer chars in 2+-letter words are tables, not text
SPLIT_FRACTIONS = (("train", 0.90), ("calib", 0.05), ("eval", 0.05))
DEFAULT_SEED = 20261129
COMMAND = "python -m jaxmoe.corpus --out data/corpus"


@dataclass(frozen=True)
class Source:
    """One Debian package: which files of it become documents and how they are cleaned."""

    package: str
    version: str
    sha256: str  # of the .deb as fetched on amd64
    kind: str  # "html" | "rst" | "pod" | "markdown" | "text" | "python"
    include: tuple[str, ...]  # fnmatch globs on the path inside the package ("usr/share/...")
    exclude: tuple[str, ...] = ()


_PY = "usr/lib/python3.11/"
_PY_EXCLUDE = (_PY + "encodings/*", _PY + "pydoc_data/*", _PY + "test/*", _PY + "*/test/*",
               _PY + "*/tests/*", _PY + "*/idle_test/*", _PY + "lib2to3/*", _PY + "_sysconfigdata*",
               _PY + "html/entities.py")

SOURCES: tuple[Source, ...] = (
    Source("python3.11-doc", "3.11.2-6+deb12u8",
           "50eb63e7f636c4281e9ce1b8f10386f1def42159eddce34fc1f41c46261df71b", "rst",
           ("usr/share/doc/python3.11/html/_sources/*.rst.txt",),
           ("*/whatsnew/changelog.rst.txt",)),
    Source("developers-reference", "12.18",
           "0dba82f6fa16e373f2a84ad07e7971aa9264ad2e7d2ae46b37edbc9c5fd57e2e", "rst",
           ("usr/share/developers-reference/_sources/*.rst.txt",)),
    Source("postgresql-doc-15", "15.18-0+deb12u1",
           "3c598277a463c44d672daa2c335deb8d8252e1852fb025fd4578ea2d9a1b90f0", "html",
           ("usr/share/doc/postgresql-doc-15/html/*.html",)),
    Source("sqlite3-doc", "3.40.1-2+deb12u2",
           "466e30d7066e2641fa13e56bc662a2ad521b8cc9c17dde9c9dac3d4f105e32f2", "html",
           ("usr/share/doc/sqlite3/*.html",),
           ("*/doc_backlink_crossref.html", "*/requirements.html", "*/keyword_index.html",
            "*/toc.html", "*/sitemap.html")),  # link lists; requirements repeat other pages
    Source("debian-handbook", "11.20220922",
           "3d5dbeac1f1afc9c094eab9d0f701f6ecff99c4927d5a4794cf6c85678134faa", "html",
           ("usr/share/doc/debian-handbook/html/en-US/*.html",)),
    Source("debian-reference-en", "2.100",
           "9f31d3a17df505de09689ca255512ea58c1fc47c59bb1b0c7bf1c23362e9743f", "html",
           ("usr/share/debian-reference/*.en.html",)),
    Source("maint-guide", "1.2.53",
           "762c8a400a36668d2eb814a3ba356b06488fd889dfce478eb11d5cfb189a47b5", "html",
           ("usr/share/doc/maint-guide/html/*.en.html",)),
    Source("gnu-standards", "2022.03.23-0.1",
           "2087dda531c69d8505856a45e0334746f3f25211a237c95d375eed13a7d8c201", "html",
           ("usr/share/doc/gnu-standards/*.html",)),
    Source("bash-doc", "5.2.15-2",
           "2c1a353f7004d14ba81db19c253b958d2dd9582027650739c530fd50376a9d8b", "html",
           ("usr/share/doc/bash/bashref.html",)),
    Source("git-doc", "1:2.39.5-0+deb12u3",
           "3c89668a11053a6bafade3de1f611f4613db31e082af63f43d8c5b69ad8795ec", "text",
           ("usr/share/doc/git-doc/*.txt",)),
    Source("perl-doc", "5.36.0-7+deb12u3",
           "e9e3564ff5ade27de0585835f2acad769bcc545c0a0045a9f55d5401f27f7591", "pod",
           ("usr/share/perl/5.36.0/pod/*.pod",),
           ("*/perltoc.pod", "*/perluniprops.pod", "*/perlko.pod", "*/perlcn.pod", "*/perltw.pod",
            "*/perljp.pod")),  # a TOC, a property table, non-English translations
    Source("python-django-doc", "3:3.2.25-0+deb12u3",
           "33319c8e45b95693603213442ccf9bcee933ef338488115203ad25a0e01c696f", "html",
           ("usr/share/doc/python-django-doc/html/*.html",),
           ("*/_modules/*", "*/genindex.html", "*/py-modindex.html", "*/search.html",
            "*/contents.html")),  # highlighted source, indexes, the TOC
    Source("python-sqlalchemy-doc", "1.4.46+ds1-1",
           "8805c3167ef75278ac6fd58ed9856321c2b2e3a7e441edba84b2eb955216d0fd", "rst",
           ("usr/share/doc/python-sqlalchemy-doc/rst/*.rst",), ("*/changelog/*",)),
    Source("sphinx-doc", "5.3.0-4",
           "1da3d08bb3a0bc82a4b8b8109410e223054bf5fb13904557ec8ea869046f65b4", "rst",
           ("usr/share/doc/sphinx-doc/html/_sources/*.rst.txt",), ("*/changes.rst.txt",)),
    Source("cmake-doc", "3.25.1-1",
           "6e805a758ffed87cc7ea234cf0a7a1bb8ae78b93d8b5783e7fb989a6320f8133", "rst",
           ("usr/share/doc/cmake-data/html/_sources/*.rst.txt",)),
    Source("debian-policy", "4.6.2.0",
           "ef9d01b625c3b87c3a845c2cd1b66f1a16e9240b2b9e5bee53472a00e8457a39", "rst",
           ("usr/share/doc/debian-policy/policy.html/_sources/*.rst.txt",)),
    Source("nodejs-doc", "18.20.4+dfsg-1~deb12u2",
           "9f674d3536be94923bb8720c48ec17bc92b8de62f2954c3172b59a3ada1de65f", "markdown",
           ("usr/share/doc/nodejs/api/*.md.gz",)),
    Source("libpython3.11-minimal", "3.11.2-6+deb12u8",
           "f3beaa03994ffedacf73c43a0843d53b062d347115d8af65bee2034552a4e6f9", "python",
           (_PY + "*.py",), _PY_EXCLUDE),
    Source("libpython3.11-stdlib", "3.11.2-6+deb12u8",
           "890b3540dad8a1ccc0deeca025db735bcc82629a76adacbe3b50fcc06ed528ca", "python",
           (_PY + "*.py",), _PY_EXCLUDE),
)


# ----------------------------------------------------------------------------------------------
# Cleaning
# ----------------------------------------------------------------------------------------------

_SKIP_TAGS = frozenset({"script", "style", "head", "nav", "form", "select", "noscript", "svg",
                        "button", "template", "map"})
_SKIP_CLASSES = frozenset({"navheader", "navfooter", "nosearch", "menu", "searchmenu", "toc",
                           "rightsidebar", "sphinxsidebar", "related", "footer", "header",
                           "breadcrumbs", "navigation", "docnav", "toc-on-this-page", "nav",
                           "global-nav", "searchformwrapper", "searchbox", "headerlink",
                           "banner", "hd", "ft"})  # ids of page banners, headers, footers
_PARAGRAPH_TAGS = frozenset({"p", "div", "section", "article", "table", "ul", "ol", "dl",
                             "blockquote", "pre", "h1", "h2", "h3", "h4", "h5", "h6", "hr",
                             "figure", "caption", "center"})
_LINE_TAGS = frozenset({"br", "tr", "dt", "dd", "li", "th"})
_VOID_TAGS = frozenset({"br", "hr", "img", "meta", "link", "input", "area", "base", "col", "wbr",
                        "source", "embed", "param", "track"})


class _HtmlText(HTMLParser):
    """HTML → text: skips boilerplate elements, keeps <pre> verbatim, collapses other whitespace."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.skip_tag: str | None = None  # name of the element being skipped
        self.skip_depth = 0  # open elements of that name inside the skipped one
        self.pre_depth = 0

    def _break(self, text: str) -> None:
        self.out.append(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self.skip_tag is not None:
            if tag == self.skip_tag:
                self.skip_depth += 1
            return
        classes = set()
        for name, value in attrs:
            if name in ("class", "id", "role") and value:
                classes.update(value.lower().split())
        if tag in _SKIP_TAGS or (classes & _SKIP_CLASSES and tag not in _VOID_TAGS):
            self.skip_tag, self.skip_depth = tag, 1
            return
        if tag == "pre":
            self.pre_depth += 1
        if tag in _PARAGRAPH_TAGS:
            self._break("\n\n")
        elif tag in _LINE_TAGS:
            self._break("\n- " if tag == "li" else "\n")
        elif tag in ("td", "th"):
            self._break(" ")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self.skip_tag is None and tag in ("br", "hr"):
            self._break("\n")

    def handle_endtag(self, tag: str) -> None:
        if self.skip_tag is not None:
            if tag == self.skip_tag:
                self.skip_depth -= 1
                if self.skip_depth == 0:
                    self.skip_tag = None
            return
        if tag == "pre" and self.pre_depth:
            self.pre_depth -= 1
        if tag in _PARAGRAPH_TAGS:
            self._break("\n\n")
        elif tag in _LINE_TAGS:
            self._break("\n")

    def handle_data(self, data: str) -> None:
        if self.skip_tag is not None:
            return
        if self.pre_depth:
            self.out.append(data)
            return
        data = re.sub(r"\s+", " ", data)
        if not self.out or self.out[-1].endswith("\n") or self.out[-1].endswith(" "):
            data = data.lstrip(" ")  # no indentation or double blank from collapsed whitespace
        if data:
            self.out.append(data)


def html_to_text(html: str) -> str:
    """Visible text of an HTML page without scripts, styles, navigation, menus or TOCs."""
    parser = _HtmlText()
    parser.feed(html)
    parser.close()
    return "".join(parser.out)


_POD_CODE = re.compile(r"([BCEFILSXZ])<([^<>]*)>")
_POD_CODE_MULTI = re.compile(r"([BCEFILSXZ])<<+\s+(.*?)\s+>>+", re.DOTALL)
_POD_ESCAPES = {"lt": "<", "gt": ">", "verbar": "|", "sol": "/", "quot": '"', "amp": "&",
                "apos": "'", "nbsp": " "}


def _pod_code(match: re.Match[str]) -> str:
    code, body = match.group(1), match.group(2)
    if code in ("X", "Z"):
        return ""
    if code == "E":
        if body in _POD_ESCAPES:
            return _POD_ESCAPES[body]
        try:
            return chr(int(body, 0) if body[:2].lower() in ("0x", "0b") or body[:1] == "0"
                       else int(body))
        except ValueError:
            return body
    if code == "L":
        return body.split("|", 1)[0] if "|" in body else body.replace("/", " ").strip('" ')
    return body


def pod_to_text(pod: str) -> str:
    """Perl POD → text: headings and items as lines, formatting codes unwrapped, directives dropped."""
    out: list[str] = []
    in_data_block = 0
    for para in re.split(r"\n[ \t]*\n", pod):
        if para.startswith("=begin"):
            in_data_block += 1
            continue
        if para.startswith("=end"):
            in_data_block = max(0, in_data_block - 1)
            continue
        if in_data_block:
            continue
        if para.startswith("="):
            head, _, rest = para.partition(" ")
            directive = head.split("\n", 1)[0][1:]
            if directive.startswith("head"):
                para = rest.strip()
            elif directive == "item":
                para = "- " + rest.strip().lstrip("*").strip() if rest.strip() not in ("", "*") else ""
            else:  # =pod =cut =over =back =for =encoding
                continue
            if not para:
                continue
        if not para[:1].isspace():  # verbatim paragraphs (indented) keep their codes
            previous = None
            while previous != para:
                previous = para
                para = _POD_CODE_MULTI.sub(_pod_code, para)
                para = _POD_CODE.sub(_pod_code, para)
        out.append(para)
    return "\n\n".join(out)


_RST_ROLE = re.compile(r"(?<![\w:`]):[A-Za-z][\w.+-]*(?::[\w.+-]+)*:(?=`)")


def rst_to_text(rst: str) -> str:
    """reStructuredText: unwrap `:role:` prefixes, keep the rest (markup is light and readable)."""
    return _RST_ROLE.sub("", rst)


_HTML_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b\ufeff]")
_SPECIALS_RE = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))


def normalize_text(text: str) -> str:
    """NFC, LF line ends, no control chars or special-token strings, no trailing or repeated blanks."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = text.replace("\xa0", " ").replace("\f", "\n")
    text = _CONTROL.sub("", text)
    text = _SPECIALS_RE.sub("", text)
    lines = [line.rstrip() for line in text.split("\n")]
    text = "\n".join(lines)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip("\n")


def clean_document(kind: str, raw: str) -> str:
    """Clean one source file of a kind ("html", "rst", "pod", "markdown", "text", "python") to text."""
    if kind == "html":
        raw = html_to_text(raw)
    elif kind == "rst":
        raw = rst_to_text(raw)
    elif kind == "pod":
        raw = pod_to_text(raw)
    elif kind == "markdown":
        raw = _HTML_COMMENT.sub("", raw)
    elif kind not in ("text", "python"):
        raise ValueError(f"unknown document kind {kind!r}")
    return normalize_text(raw)


def word_fraction(text: str) -> float:
    """Fraction of a text's characters that lie in ASCII words of two or more letters."""
    return sum(len(w) for w in _WORD.findall(text)) / max(1, len(text))


_WORD = re.compile(r"[A-Za-z]{2,}")


def filter_documents(docs: Iterable[tuple[str, str]], min_chars: int = MIN_DOC_CHARS,
                     min_word_fraction: float = MIN_WORD_FRACTION) -> tuple[list[tuple[str, str]], dict]:
    """Drop short, table-like and duplicate documents (first in id order kept) → (kept, drop counts)."""
    kept: list[tuple[str, str]] = []
    seen: set[bytes] = set()
    dropped = {"tiny": 0, "low_text": 0, "duplicate": 0}
    for doc_id, text in sorted(docs):
        if len(text) < min_chars:
            dropped["tiny"] += 1
            continue
        if word_fraction(text) < min_word_fraction:
            dropped["low_text"] += 1
            continue
        digest = hashlib.sha256(text.encode("utf-8")).digest()
        if digest in seen:
            dropped["duplicate"] += 1
            continue
        seen.add(digest)
        kept.append((doc_id, text))
    return kept, dropped


# ----------------------------------------------------------------------------------------------
# Split
# ----------------------------------------------------------------------------------------------

def _unit_hash(key: str) -> float:
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2.0**64


def split_of(doc_id: str, seed: int = DEFAULT_SEED,
             fractions: Sequence[tuple[str, float]] = SPLIT_FRACTIONS) -> str:
    """The split ("train", "calib", "eval") of a document, from a seeded hash of its id."""
    u = _unit_hash(f"{seed}\0{doc_id}")
    edge = 0.0
    for name, fraction in fractions:
        edge += fraction
        if u < edge:
            return name
    return fractions[-1][0]


def order_key(doc_id: str, seed: int = DEFAULT_SEED) -> float:
    """Position of a document inside its split (a second seeded hash: a deterministic shuffle)."""
    return _unit_hash(f"order\0{seed}\0{doc_id}")


def split_documents(docs: Iterable[tuple[str, str]], seed: int = DEFAULT_SEED
                    ) -> dict[str, list[tuple[str, str]]]:
    """Group (id, text) documents by `split_of`, each group in `order_key` order."""
    groups: dict[str, list[tuple[str, str]]] = {name: [] for name, _ in SPLIT_FRACTIONS}
    for doc_id, text in docs:
        groups[split_of(doc_id, seed)].append((doc_id, text))
    for members in groups.values():
        members.sort(key=lambda d: (order_key(d[0], seed), d[0]))
    return groups


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------

def train_tokenizer(texts: Iterable[str], vocab_size: int = VOCAB_SIZE):
    """Train a byte-level BPE tokenizer (specials first: <|endoftext|>=0, <|pad|>=1)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_tokenizer(path: str | os.PathLike = TOKENIZER_PATH):
    """Load a tokenizer.json; InputError if it is missing, unreadable or lacks the special tokens."""
    from tokenizers import Tokenizer

    path = Path(path)
    if not path.is_file():
        raise InputError(path, "tokenizer file not found (build one with --retrain-tokenizer)")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # noqa: BLE001 -- tokenizers raises a bare Exception on bad JSON
        raise InputError(path, f"not a tokenizers JSON file ({str(exc).splitlines()[0][:120]})") from None
    for i, name in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(name) != i:
            raise InputError(path, f"special token {name!r} must have id {i}")
    return tok


def special_token_ids(tok) -> dict[str, int]:
    """{special token string: id} of a tokenizer."""
    return {name: tok.token_to_id(name) for name in SPECIAL_TOKENS}


def encode_documents(tok, texts: Sequence[str], eos_id: int) -> tuple[np.ndarray, list[int]]:
    """Token ids of documents, each followed by `eos_id`, as one uint16 array; and per-doc counts."""
    if tok.get_vocab_size() > 65536:
        raise ValueError("vocabulary too large for uint16 token files")
    pieces: list[np.ndarray] = []
    counts: list[int] = []
    batch = 256
    for start in range(0, len(texts), batch):
        for enc in tok.encode_batch(list(texts[start:start + batch]), add_special_tokens=False):
            ids = np.asarray(enc.ids, dtype=np.uint16)
            pieces.append(ids)
            pieces.append(np.array([eos_id], dtype=np.uint16))
            counts.append(len(ids))
    arr = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.uint16)
    return arr, counts


# ----------------------------------------------------------------------------------------------
# Fetch and read sources
# ----------------------------------------------------------------------------------------------

def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _deb_field(deb: Path, field: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), field], check=True, capture_output=True,
                          text=True).stdout.strip()


def fetch_deb(source: Source, cache_dir: Path, any_version: bool) -> tuple[Path, str, str]:
    """The .deb of a source in `cache_dir` (fetched with apt-get download) → (path, version, sha256)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    version = None if any_version else source.version
    for deb in sorted(cache_dir.glob(f"{source.package}_*.deb")):
        got = _deb_field(deb, "Version")
        if version is None or got == version:
            break
    else:
        spec = source.package if version is None else f"{source.package}={version}"
        proc = subprocess.run(["apt-get", "download", "-q", spec], cwd=cache_dir, check=False,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            detail = (proc.stderr.strip().splitlines() or ["no message"])[-1]
            raise InputError(None, f"apt-get download {spec} failed: {detail} "
                             "(run 'apt-get update'; or pass --any-version to take the current one)")
        debs = sorted(cache_dir.glob(f"{source.package}_*.deb"), key=lambda p: p.stat().st_mtime)
        if not debs:
            raise InputError(cache_dir, f"apt-get download {spec} left no .deb")
        deb = debs[-1]
        got = _deb_field(deb, "Version")
    digest = sha256_file(deb)
    if not any_version and digest != source.sha256:
        raise InputError(deb, f"sha256 {digest} differs from the pinned {source.sha256}")
    return deb, got, digest


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _selected(rel: str, source: Source) -> bool:
    return (any(fnmatch.fnmatchcase(rel, g) for g in source.include)
            and not any(fnmatch.fnmatchcase(rel, g) for g in source.exclude))


def iter_source_documents(source: Source, root: Path) -> Iterator[tuple[str, str]]:
    """(doc_id, cleaned text) for every selected file of an extracted package, in path order."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())
    for path in files:
        rel = path.relative_to(root).as_posix()
        if _selected(rel, source):
            yield f"{source.package}/{rel}", clean_document(source.kind, _read_text(path))


# ----------------------------------------------------------------------------------------------
# Build
# ----------------------------------------------------------------------------------------------

def _display_path(path: Path) -> str:
    """A path as written in meta.json: relative to the repository when inside it."""
    path = Path(path).resolve()
    repo = TOKENIZER_PATH.parent.parent
    return path.relative_to(repo).as_posix() if path.is_relative_to(repo) else str(path)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build(out_dir: Path, cache_dir: Path, tokenizer_path: Path, retrain: bool, any_version: bool,
          seed: int, vocab_size: int, sources: Sequence[Source] = SOURCES) -> dict:
    """Fetch, clean, split, tokenize; write .bin files, documents.tsv and meta.json → the meta."""
    if not retrain:
        load_tokenizer(tokenizer_path)  # fail before the slow part
    source_meta = []
    docs: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="corpus-") as tmp:
        for source in sources:
            deb, version, digest = fetch_deb(source, cache_dir, any_version)
            root = Path(tmp) / source.package
            subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
            got = list(iter_source_documents(source, root))
            if not got:
                raise InputError(deb, f"no files match {source.include}")
            docs.extend(got)
            source_meta.append({"package": source.package, "version": version, "deb": deb.name,
                                "sha256": digest, "kind": source.kind,
                                "include": list(source.include), "exclude": list(source.exclude),
                                "files": len(got)})
            _log(f"{source.package} {version}: {len(got)} files, "
                 f"{sum(len(t) for _, t in got) / 1e6:.1f} M chars")
    kept, dropped = filter_documents(docs)
    per_package: dict[str, list[int]] = {}
    for doc_id, text in kept:
        per_package.setdefault(doc_id.split("/", 1)[0], []).append(len(text))
    for entry in source_meta:
        sizes = per_package.get(entry["package"], [])
        entry["documents"] = len(sizes)
        entry["chars"] = sum(sizes)
    groups = split_documents(kept, seed)

    if retrain:
        _log(f"training BPE tokenizer (vocab {vocab_size}) on the train split")
        tok = train_tokenizer((text for _, text in groups["train"]), vocab_size)
        with atomic_path(tokenizer_path) as tmp_path:
            tok.save(str(tmp_path))
    tok = load_tokenizer(tokenizer_path)
    ids = special_token_ids(tok)
    eos_id = ids[EOS_TOKEN]

    split_meta = {}
    rows = ["doc_id\tsplit\tchars\ttokens"]
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, _ in SPLIT_FRACTIONS:
        texts = [text for _, text in groups[name]]
        _log(f"encoding {name}: {len(texts)} documents")
        arr, counts = encode_documents(tok, texts, eos_id)
        path = out_dir / f"{name}.bin"
        with atomic_path(path) as tmp_path:
            arr.astype("<u2").tofile(tmp_path)
        n_chars = sum(len(t) for t in texts)
        split_meta[name] = {"file": path.name, "documents": len(texts), "tokens": int(arr.size),
                            "eos_tokens": len(texts), "chars": n_chars,
                            "bytes": int(arr.size) * 2, "sha256": sha256_file(path),
                            "chars_per_token": round(n_chars / max(1, arr.size - len(texts)), 4)}
        rows += [f"{d}\t{name}\t{len(t)}\t{c}" for (d, t), c in zip(groups[name], counts)]
    write_text_atomic(out_dir / "documents.tsv", "\n".join(rows) + "\n")

    sizes = sorted(len(t) for _, t in kept)
    meta = {
        "description": "Offline English technical prose + Python code corpus from Debian packages",
        "command": COMMAND,
        "format": {"dtype": "uint16 little-endian", "layout": "documents concatenated in split "
                   "order; each document's tokens are followed by eos_id"},
        "tokenizer": {"path": _display_path(tokenizer_path), "sha256": sha256_file(tokenizer_path),
                      "type": "byte-level BPE (tokenizers)", "vocab_size": tok.get_vocab_size(),
                      "special_tokens": ids, "eos_id": eos_id, "pad_id": ids[PAD_TOKEN]},
        "split": {"seed": seed, "fractions": dict(SPLIT_FRACTIONS),
                  "rule": "u = int(sha256(f'{seed}\\0{doc_id}')[:8]) / 2**64; train if u < 0.90, "
                          "calib if u < 0.95, else eval; order in split by sha256(f'order\\0{seed}"
                          "\\0{doc_id}')"},
        "cleaning": {"min_doc_chars": MIN_DOC_CHARS, "min_word_fraction": MIN_WORD_FRACTION,
                     "files_read": len(docs), "dropped": dropped, "documents": len(kept)},
        "document_chars": {"min": sizes[0], "median": int(statistics.median(sizes)),
                           "mean": round(statistics.fmean(sizes), 1), "max": sizes[-1],
                           "total": sum(sizes)},
        "sources": source_meta,
        "splits": split_meta,
    }
    write_text_atomic(out_dir / "meta.json", json.dumps(meta, indent=2) + "\n")
    return meta


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jaxmoe.corpus",
        description="Build the offline training corpus (Debian documentation and Python stdlib "
                    "packages) and its uint16 token files: train/calib/eval .bin + meta.json.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  python -m jaxmoe.corpus --out data/corpus\n"
               "      rebuild data/corpus with the committed jaxmoe/tokenizer.json\n"
               "  python -m jaxmoe.corpus --out data/corpus --retrain-tokenizer\n"
               "      also retrain jaxmoe/tokenizer.json on the train split (changes all ids)\n"
               "  python -m jaxmoe.corpus --out /tmp/c --deb-cache /tmp/debs --any-version\n"
               "      take the archive's current package versions (numbers will differ)\n")
    p.add_argument("--out", required=True, type=Path, help="output folder (e.g. data/corpus)")
    p.add_argument("--deb-cache", type=Path, default=Path("data/debs"),
                   help="where fetched .deb files are kept and reused (default: data/debs)")
    p.add_argument("--tokenizer", type=Path, default=TOKENIZER_PATH,
                   help="tokenizer JSON to use or (re)train (default: jaxmoe/tokenizer.json)")
    p.add_argument("--retrain-tokenizer", action="store_true",
                   help="train the BPE tokenizer on the train split and overwrite --tokenizer")
    p.add_argument("--vocab-size", type=int, default=VOCAB_SIZE,
                   help=f"vocabulary size when retraining (default: {VOCAB_SIZE})")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED,
                   help=f"seed of the document split hash (default: {DEFAULT_SEED})")
    p.add_argument("--any-version", action="store_true",
                   help="fetch each package's current version instead of the pinned one")
    return p


@exit_on_input_error
def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: build the corpus."""
    args = _parser().parse_args(argv)
    if not 256 + len(SPECIAL_TOKENS) < args.vocab_size <= 65536:
        raise InputError(None, f"--vocab-size {args.vocab_size} must be in (258, 65536]")
    meta = build(args.out, args.deb_cache, args.tokenizer, args.retrain_tokenizer,
                 args.any_version, args.seed, args.vocab_size)
    for name, s in meta["splits"].items():
        print(f"{name}: {s['documents']} documents, {s['tokens']} tokens, {s['bytes']} bytes, "
              f"sha256 {s['sha256']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
