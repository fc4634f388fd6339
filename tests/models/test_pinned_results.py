"""Short training runs pinned to the numbers the code gave before the models/ refactor (issue 11).

Each run goes through the command line (`hmd train`, `hmd defend`, `hmd distill`; see
:mod:`tests.models.pinned_runs`), so both the library and the commands' defaults are held to the
same results: seeded, one thread, tiny sizes. A refactor that changes any of these numbers
changed what a command computes.

The values were produced by ``python -m tests.models.test_pinned_results`` at the commit that
added this file (before any refactoring) and are compared to 1e-6 relative.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from tests.models.pinned_runs import RUNS, numbers_of

PINNED: dict[str, dict[str, float | None]] = {
    'train-great': {
        'e1/train/aux_acc': 0.25,
        'e1/train/aux_loss': 1.7615894675254822,
        'e1/train/gamma_mean': 0.9999986886978149,
        'e1/train/loss_class': 1.5762333869934082,
        'e1/train/loss_colour': 0.06809345819056034,
        'e1/train/loss_denoised': 0.036341008730232716,
        'e1/train/loss_edges': 0.1419004127383232,
        'e1/val/class_error_pct': 82.8125,
        'e1/val/rmse_colour': 0.21198664065470132,
        'e1/val/rmse_denoised': 0.1717076570643649,
        'e1/val/rmse_edges': 0.39128488117035415,
        'e1/lr': 0.001,
        'e1/weight/class': 1.0000004768371582,
        'e1/weight/colour': 0.9999992847442627,
        'e1/weight/denoised': 1.0000015497207642,
        'e1/weight/edges': 1.0000004768371582,
        'e2/train/aux_acc': 0.25,
        'e2/train/aux_loss': 1.6592410802841187,
        'e2/train/gamma_mean': 1.0000028610229492,
        'e2/train/loss_class': 1.7411831617355347,
        'e2/train/loss_colour': 0.054595792666077614,
        'e2/train/loss_denoised': 0.026827232912182808,
        'e2/train/loss_edges': 0.12376508116722107,
        'e2/val/class_error_pct': 82.8125,
        'e2/val/rmse_colour': 0.21482257160649296,
        'e2/val/rmse_denoised': 0.16445744184867397,
        'e2/val/rmse_edges': 0.3909538791924105,
        'e2/lr': 0.0005358867312681466,
        'e2/weight/class': 1.0000081062316895,
        'e2/weight/colour': 1.0000025033950806,
        'e2/weight/denoised': 0.9999997615814209,
        'e2/weight/edges': 1.0000046491622925,
        'weights_abs_sum': 4884.775453953178,
    },
    'train-equal-defence': {
        'e1/train/defence_alpha': 0.0,
        'e1/train/defence_aux_acc': 0.25,
        'e1/train/defence_aux_loss': 1.8013516068458557,
        'e1/train/defence_beta': 0.0,
        'e1/train/loss_class': 1.5759031772613525,
        'e1/train/loss_colour': 0.06802314706146717,
        'e1/train/loss_denoised': 0.03632376156747341,
        'e1/train/loss_edges': 0.14160963892936707,
        'e1/val/class_error_pct': 82.8125,
        'e1/val/rmse_colour': 0.2119971609015464,
        'e1/val/rmse_denoised': 0.17171909023317156,
        'e1/val/rmse_edges': 0.3912824819566904,
        'e1/lr': 0.001,
        'e1/weight/class': 1.0,
        'e1/weight/colour': 1.0,
        'e1/weight/denoised': 1.0,
        'e1/weight/edges': 1.0,
        'e2/train/defence_alpha': 0.46411326873185343,
        'e2/train/defence_aux_acc': 0.25,
        'e2/train/defence_aux_loss': 1.7350501418113708,
        'e2/train/defence_beta': 0.9282265374637069,
        'e2/train/loss_class': 1.7517518997192383,
        'e2/train/loss_colour': 0.05380783975124359,
        'e2/train/loss_denoised': 0.02623564377427101,
        'e2/train/loss_edges': 0.12443017587065697,
        'e2/val/class_error_pct': 82.8125,
        'e2/val/rmse_colour': 0.21487308648695977,
        'e2/val/rmse_denoised': 0.16444853370763218,
        'e2/val/rmse_edges': 0.3909596154401542,
        'e2/lr': 0.0005358867312681466,
        'e2/weight/class': 1.0,
        'e2/weight/colour': 1.0,
        'e2/weight/denoised': 1.0,
        'e2/weight/edges': 1.0,
        'weights_abs_sum': 4884.414133213989,
    },
    'defend-great+ce': {
        'e1/train/alpha': 0.0,
        'e1/train/aux_acc': 0.375,
        'e1/train/aux_loss': 1.7509080171585083,
        'e1/train/beta': 0.0,
        'e1/train/ce': 1.8969775438308716,
        'e1/val_accuracy': 28.125,
        'e1/lr_multiplier': 1.0,
        'e2/train/alpha': 0.46411326873185343,
        'e2/train/aux_acc': 0.25,
        'e2/train/aux_loss': 1.7166725397109985,
        'e2/train/beta': 0.9282265374637069,
        'e2/train/ce': 1.7986851930618286,
        'e2/val_accuracy': 26.5625,
        'e2/lr_multiplier': 0.5358867312681466,
        'train_accuracy_pct': 29.166666666666668,
        'val_accuracy_pct': 26.5625,
        'final_alpha': 0.46411326873185343,
        'final_beta': 0.9282265374637069,
        'weights_abs_sum': 448.68584135907076,
    },
    'distill-great': {
        'e1/train/ce': 1.9589694142341614,
        'e1/train/disc_acc': 0.5,
        'e1/train/disc_loss': 1.398073136806488,
        'e1/val_accuracy': 17.1875,
        'e1/lr_multiplier': 1.0,
        'e2/train/ce': 2.014791786670685,
        'e2/train/disc_acc': 0.5625,
        'e2/train/disc_loss': 1.2162437438964844,
        'e2/val_accuracy': 3.125,
        'e2/lr_multiplier': 0.5358867312681466,
        'train_accuracy_pct': 33.333333333333336,
        'val_accuracy_pct': 3.125,
        'teacher_val_accuracy_pct': 26.5625,
        'weights_abs_sum': 2465.049495938836,
    },
}


def test_short_runs_give_the_pre_refactor_numbers(pinned_runs):
    got = {name: numbers_of(pinned_runs / name) for name in RUNS}
    assert set(got) == set(PINNED)
    for name, numbers in PINNED.items():
        assert set(got[name]) == set(numbers), name
        for key, want in numbers.items():
            have = got[name][key]
            if want is None:
                assert have is None, (name, key)
            else:
                assert math.isclose(have, want, rel_tol=1e-6, abs_tol=1e-9), (name, key, have, want)


if __name__ == "__main__":  # regenerate (only when a result is MEANT to change, and say why)
    import tempfile

    from tests.models.pinned_runs import run_all

    with tempfile.TemporaryDirectory() as d:
        run_all(Path(d))
        res = {name: numbers_of(Path(d) / name) for name in RUNS}
    sys.stdout = sys.__stdout__
    print(json.dumps(res, indent=1))
