"""The decision rule on constructed inputs whose right answer is known by construction."""
import math

import pandas as pd
import pytest

from analysis.verdict import RULE, Rule, assess, decide, sensitivity, verdict

NAN = math.nan


def row(model="qwen3-30b-a3b", vram=12, pcie="gen4x16", policy="static", signal="mass", threshold="30%",
        low="q2_k", d=0.0, lo=None, hi=None, kld=0.005, klo=None, khi=None, scenario="base", gpu="rtx3060"):
    lo = d - 0.01 if lo is None else lo
    hi = d + 0.01 if hi is None else hi
    klo = kld * 0.8 if klo is None else klo
    khi = kld * 1.2 if khi is None else khi
    return dict(model=model, gpu=gpu, vram_gb=vram, pcie=pcie, policy=policy, signal=signal, threshold=threshold,
                low_format=low, delta=d, delta_lo=lo, delta_hi=hi, kld=kld, kld_lo=klo, kld_hi=khi, scenario=scenario)


def native(**kw):
    return row(policy="native", signal="", threshold="", low="", d=0.0, lo=0.0, hi=0.0, kld=0.0, klo=0.0, khi=0.0, **kw)


def settings_grid(make):
    """Every (model, vram, pcie) of a small grid with a native row plus make(model, vram, pcie) rows."""
    rows = []
    for model in ("qwen3-30b-a3b", "mixtral-8x7b"):
        for vram in (8, 12):
            for pcie in ("gen3x16", "gen5x16"):
                rows.append(native(model=model, vram=vram, pcie=pcie))
                rows += make(model, vram, pcie)
    return pd.DataFrame(rows)


def test_all_below_threshold_rejects_everywhere_and_names_the_nearest_miss():
    df = settings_grid(lambda m, v, p: [row(model=m, vram=v, pcie=p, d=0.03), row(model=m, vram=v, pcie=p,
                                                                                   policy="dynamic", d=0.045)])
    # the nearest miss: one setting with a slightly higher lower bound
    df.loc[(df.model == "mixtral-8x7b") & (df.vram_gb == 8) & (df.pcie == "gen3x16") & (df.policy == "dynamic"),
           ["delta", "delta_lo"]] = [0.06, 0.049]
    v = verdict(df)
    assert not v.settings["recommended"].any() and len(v.settings) == 8
    assert v.text.startswith("Reject: no precision policy meets the rule in any of the 8 settings.")
    assert "nearest miss is dynamic" in v.text and "mixtral-8x7b on rtx3060 (8 GB VRAM, gen3x16)" in v.text
    assert "+4.9 %" in v.text and "lower bound is under the threshold" in v.text
    assert "No sensitivity scenario was checked." in v.text


def test_one_clear_winner_is_named_with_its_numbers():
    def make(m, v, p):
        out = [row(model=m, vram=v, pcie=p, d=0.02), row(model=m, vram=v, pcie=p, policy="dynamic", d=0.01)]
        if (m, v, p) == ("mixtral-8x7b", 8, "gen3x16"):
            out.append(row(model=m, vram=v, pcie=p, signal="freq", threshold="20%", low="q3_k", d=0.12, lo=0.08,
                           hi=0.16, kld=0.006, klo=0.004, khi=0.008))
        return out

    v = verdict(settings_grid(make))
    s = v.settings
    assert s["recommended"].sum() == 1
    win = s[s.recommended].iloc[0]
    assert (win.model, win.vram_gb, win.pcie, win.signal, win.low_format) == ("mixtral-8x7b", 8, "gen3x16", "freq",
                                                                             "q3_k")
    assert v.text.startswith("Implement static (signal freq, threshold 20%, low format q3_k) for mixtral-8x7b on "
                             "rtx3060 (8 GB VRAM, gen3x16): Δ tok/s +12.0 % [95 % interval +8.0 %, +16.0 %] at "
                             "KLD 0.0060 [0.0040, 0.0080]")
    assert "met in this 1 of 8 settings; reject everywhere else." in v.text


def test_fast_but_too_lossy_fails_on_quality_and_best_passing_is_chosen():
    df = pd.DataFrame([
        native(),
        row(d=0.30, lo=0.25, hi=0.35, kld=0.05, klo=0.04, khi=0.06),  # big gain, far too lossy
        row(policy="dynamic", d=0.20, lo=0.15, hi=0.25, kld=0.009, klo=0.006, khi=0.0101),  # upper bound just over
        row(signal="weight", d=0.08, lo=0.06, hi=0.10, kld=0.004, klo=0.003, khi=0.005),  # passes
        row(signal="freq", d=0.09, lo=0.055, hi=0.12, kld=0.003, klo=0.002, khi=0.004),  # passes, lower lo
    ])
    a = assess(df)
    assert a.status.tolist() == ["baseline", "quality_fails", "quality_fails", "pass", "pass"]
    d = decide(df).iloc[0]
    assert d.recommended and d.signal == "weight" and d.n_pass == 2 and d.n_policies == 4
    # with the point estimate instead of the upper bound the dynamic row would pass (and win)
    assert decide(df.assign(kld_hi=NAN), Rule(allow_point_kld=True)).iloc[0].policy == "dynamic"
    assert not decide(df.assign(kld_hi=NAN)).iloc[0].recommended  # strict rule: quality unknown
    assert set(assess(df.assign(kld_hi=NAN)).status) == {"baseline", "quality_unknown"}


def test_thresholds_are_inclusive_and_both_failures_reported():
    df = pd.DataFrame([row(d=0.06, lo=0.05, kld=0.008, khi=0.010), row(d=0.0, lo=-0.01, kld=0.1, khi=0.2),
                       row(d=0.1, lo=NAN)])
    assert assess(df).status.tolist() == ["pass", "gain_below+quality_fails", "gain_unknown"]
    assert RULE.min_gain == 0.05 and RULE.max_kld == 0.010


def test_verdict_that_flips_under_sensitivity_is_flagged():
    base = [native(), row(d=0.07, lo=0.055, hi=0.09), row(policy="dynamic", d=0.03)]
    slow_pcie = [native(scenario="pcie 6 GB/s"), row(d=0.20, lo=0.15, hi=0.25, scenario="pcie 6 GB/s"),
                 row(policy="dynamic", d=0.08, lo=0.06, hi=0.1, scenario="pcie 6 GB/s")]
    equal_compute = [native(scenario="q2_k computes as fast as q4_k"),
                     row(d=0.045, lo=0.03, hi=0.06, scenario="q2_k computes as fast as q4_k"),
                     row(policy="dynamic", d=0.02, scenario="q2_k computes as fast as q4_k")]
    v = verdict(pd.DataFrame(base + slow_pcie + equal_compute))
    assert v.settings.recommended.tolist() == [True]  # the base scenario decides
    f = v.flips.sort_values("scenario")
    assert f[["policy", "scenario", "base_passes", "passes"]].values.tolist() == [
        ["dynamic", "pcie 6 GB/s", False, True],
        ["static", "q2_k computes as fast as q4_k", True, False],
    ]
    assert "not robust inside the sensitivity range" in v.text
    assert "static (signal mass, threshold 30%, low format q2_k) for qwen3-30b-a3b on rtx3060 (12 GB VRAM, gen4x16) " \
           "fails under 'q2_k computes as fast as q4_k'" in v.text
    # no flip: the same numbers under a scenario that changes nothing
    same = pd.DataFrame(base + [dict(r, scenario="ctx 8k") for r in base])
    v2 = verdict(same)
    assert v2.flips.empty and "No verdict flips under the 1 sensitivity scenario(s) checked." in v2.text


def test_bad_input_names_the_missing_columns():
    with pytest.raises(ValueError, match="kld_hi"):
        verdict(pd.DataFrame([row()]).drop(columns="kld_hi"))
    assert sensitivity(pd.DataFrame([row()])).empty


def test_settings_with_only_the_native_row_are_rejects():
    v = verdict(pd.DataFrame([native(), native(vram=24)]))
    assert v.settings.recommended.tolist() == [False, False] and v.settings.n_policies.tolist() == [0, 0]
    assert v.text.startswith("Reject: no precision policy meets the rule in any of the 2 settings.")


def test_proxy_model_bound_scales_with_its_own_q4k_loss():
    """kld_unit carries 'as much damage again as Q4_K' to a model whose own Q4_K loss is smaller."""
    df = pd.DataFrame([native(), row(d=0.2, kld=0.0008, khi=0.001)])
    assert assess(df, Rule())["passes"].tolist() == [False, True]  # 0.001 ≤ 0.010
    proxy = Rule(kld_unit=0.05)  # its Q4_K costs 0.05 × Q4_K_M's loss → bound 5e-4
    assert proxy.kld_bound == pytest.approx(5e-4)
    a = assess(df, proxy)
    assert a["passes"].tolist() == [False, False] and a["status"].iloc[1] == "quality_fails"


def test_quality_measured_at_a_lighter_operating_point_does_not_count():
    base = [native(), row(d=0.2, kld=0.001, khi=0.001)]
    df = pd.DataFrame(base).assign(low_precision_mass=[0.0, 0.30], quality_low_mass=[0.0, 0.09])
    a = assess(df)
    assert a["status"].iloc[1] == "quality_unknown" and not a["passes"].iloc[1]
    a = assess(df.assign(quality_low_mass=[0.0, 0.30]))  # measured at the replay's own mass: counts
    assert a["status"].iloc[1] == "pass"


def test_setting_table_reports_status_under_the_verdicts_rule():
    """A KLD between the scaled bound and the default bound passes the default rule but not the verdict's."""
    from analysis.decision import setting_table

    df = pd.DataFrame([native(), row(d=0.2, lo=0.15, hi=0.25, kld=5e-4, klo=4e-4, khi=6e-4)])
    df["hit_rate"], df["hit_rate_lo"], df["hit_rate_hi"], df["low_precision_mass"] = 0.5, 0.4, 0.6, 0.1
    df["precision"] = ["native", "static:mass:30%:q2_k"]
    scaled = Rule(kld_unit=0.005)  # bound 5e-5 < the row's KLD upper bound 6e-4 < the default 0.010
    assert setting_table(df, 12, "gen4x16")["rule"].tolist() == ["baseline", "pass"]
    assert setting_table(df, 12, "gen4x16", scaled)["rule"].tolist() == ["baseline", "quality_fails"]
    assert not verdict(df, scaled).settings["recommended"].any() and verdict(df).settings["recommended"].all()


def test_sensitivity_table_judges_under_the_verdicts_rule():
    """The table beside the verdict must not recommend what the verdict's (scaled) rule rejects."""
    from analysis.decision import sensitivity_table

    rows = []
    for sc in ("base", "pcie-half"):
        rows += [native(scenario=sc), row(d=0.2, lo=0.15, hi=0.25, kld=5e-4, klo=4e-4, khi=6e-4, scenario=sc)]
    df = pd.DataFrame(rows)
    scaled = Rule(kld_unit=0.005)  # bound 5e-5 < the row's KLD upper bound 6e-4 < the default 0.010
    t = sensitivity_table(verdict(df, scaled))
    assert len(t) == 1 and t["base verdict"].iloc[0].startswith("no: best") and t["flips"].iloc[0] == ""
    assert sensitivity_table(verdict(df))["base verdict"].iloc[0].startswith("**yes**")


def test_setting_sentence_names_the_fastest_failure_and_the_fastest_quality_pass():
    from analysis.verdict import setting_sentence

    df = pd.DataFrame([native(), row(d=0.2, lo=0.15, hi=0.25, kld=0.05), row(threshold="50%", d=0.03, kld=0.001),
                       native(vram=8), row(vram=8, d=0.2, lo=0.15, hi=0.25, kld=0.001)])
    t = setting_sentence(df, "qwen3-30b-a3b", 12, "gen4x16")
    assert t.startswith("For qwen3-30b-a3b on rtx3060 (12 GB VRAM, gen4x16): reject. The fastest candidate, "
                        "static (signal mass, threshold 30%, low format q2_k)")
    assert "its KLD bound exceeds the quality limit" in t and "The fastest whose quality passes, static (signal mass, " \
        "threshold 50%" in t
    assert setting_sentence(df, "qwen3-30b-a3b", 8, "gen4x16").startswith(
        "For qwen3-30b-a3b on rtx3060 (8 GB VRAM, gen4x16): implement static (signal mass, threshold 30%")
    assert setting_sentence(df, "qwen3-30b-a3b", 24, "gen4x16") is None
