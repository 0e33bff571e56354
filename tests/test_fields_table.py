"""eval/fields_table.py: no skips against full per field, paired by seed, one Holm family per metric over
the fields, and FID minus floor only where the field's extractor is usable."""

import pytest
from helpers.eval_scripts import eval_script


def driver():
    return eval_script("fields_table")


def config(denoise, fid, floor):
    return {"seeds": [0, 1, 2], "values": {"denoise": denoise, "fid": fid, "fid_floor": floor}}


def summary():
    floor = [0.1, 0.2, 0.1]
    return {
        "datasets": {
            "moon, 16px": {
                "configurations": {
                    "skips=full": config([0.30, 0.31, 0.32], [5.0, 5.2, 5.1], floor),
                    "skips=none": config([0.70, 0.72, 0.71], [6.0, 5.9, 6.3], floor),
                }
            },
            "retina, 16px": {
                "configurations": {
                    "skips=full": config([0.100, 0.101, 0.102], [9.0, 9.0, 9.0], floor),
                    "skips=none": config([0.101, 0.099, 0.104], [9.0, 9.0, 9.0], floor),
                }
            },
        }
    }


def test_each_field_is_paired_and_holm_runs_over_the_fields():
    module = driver()
    rankings = module.rank_fields(module.field_values(summary()))
    moon, retina = (module._none_row(rankings["denoise_mse"][f]) for f in ("moon", "retina"))
    assert moon["values_by_seed"] == {"0": 0.70, "1": 0.72, "2": 0.71} and moon["shared_seeds"] == 3
    assert moon["delta"] == pytest.approx(0.40) and moon["test"] == "paired"
    assert moon["verdict"] == "worse" and rankings["denoise_mse"]["moon"]["family"]["tables"] == 2
    assert moon["p"] < moon["p_holm"] <= 2 * moon["p"]  # the smaller p is multiplied by the family's size
    assert retina["verdict"] == "undecided at this seed count"
    assert "moon" in rankings["fid_minus_floor"] and "retina" not in rankings["fid_minus_floor"]  # not usable
    fid = rankings["fid_minus_floor"]["moon"]
    assert module._none_row(fid)["delta"] == pytest.approx((1.0 + 0.7 + 1.2) / 3) and fid["family"]["tables"] == 1
    assert "– (extractor not usable)" in module.markdown(rankings)
