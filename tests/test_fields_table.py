"""eval/fields_table.py: no skips against full per field, paired by seed, one Holm family per metric over
the fields, and FID minus floor only where the field's extractor is usable."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def driver():
    spec = importlib.util.spec_from_file_location("fields_table", ROOT / "eval" / "fields_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    rows = module.field_rows(summary())
    module.add_holm(rows)
    moon, retina = rows["moon"]["denoise_mse"], rows["retina"]["denoise_mse"]
    assert moon["differences"] == pytest.approx([0.40, 0.41, 0.39]) and moon["delta"] == pytest.approx(0.40)
    assert moon["verdict"] == "worse without skips" and moon["family"]["fields"] == ["moon", "retina"]
    assert moon["p"] < moon["p_holm"] <= 2 * moon["p"]  # the smaller p is multiplied by the family's size
    assert retina["verdict"] == "undecided at this seed count"
    assert "fid_minus_floor" in rows["moon"] and "fid_minus_floor" not in rows["retina"]  # retina's FID: not usable
    fid = rows["moon"]["fid_minus_floor"]
    assert fid["delta"] == pytest.approx((1.0 + 0.7 + 1.2) / 3) and fid["family"]["fields"] == ["moon"]
    assert "– (extractor not usable)" in module.markdown(rows)
