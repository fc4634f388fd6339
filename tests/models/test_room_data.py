"""The rooms[:N][:STYLE] source and the ordinal depth metric of `hmd bench room-real`."""
import numpy as np
import pytest

from models.room_data import (DEFAULT_ROOMS_N, load_rooms, lower_is_nearer, motorcycle_depth_order,
                              ordinal_depth_agreement, parse_rooms, random_pairs)
from shared.errors import UserError


def test_parse_rooms():
    assert parse_rooms("rooms") == (DEFAULT_ROOMS_N, "mixed")
    assert parse_rooms("rooms:64") == (64, "mixed")
    assert parse_rooms("rooms:office") == (DEFAULT_ROOMS_N, "office")
    assert parse_rooms("rooms:64:living") == (64, "living")
    assert parse_rooms("rooms:bare:8") == (8, "bare")


@pytest.mark.parametrize("spec, message", [
    ("rooms:1", "N >= 2, got 1"),
    ("rooms:0:office", "N >= 2, got 0"),
    ("rooms:-3", "N >= 2, got -3"),
    ("rooms:64:castle", "'castle' is neither a count nor a style"),
])
def test_bad_rooms_specs_are_one_clear_line(spec, message):
    with pytest.raises(UserError, match=message) as err:
        parse_rooms(spec)
    assert "\n" not in str(err.value)


def test_load_rooms_train_and_val_are_different_rooms():
    train = load_rooms("rooms:4:office", "train", size=32, seed=1)
    val = load_rooms("rooms:4:office", "val", size=32, seed=1)
    assert train.rgb.shape == (4, 32, 32, 3) and val.rgb.shape == (2, 32, 32, 3)  # 15% of N, at least 2
    assert train.heatmaps.shape == (4, 32, 8, 8) and train.depth.dtype == np.float32
    assert not np.array_equal(train.depth[:2], val.depth)
    with pytest.raises(UserError, match="unknown split"):
        load_rooms("rooms:4", "test", size=32)


def _all_pairs(n):
    a, b = np.triu_indices(n, 1)
    return a, b


def test_ordinal_agreement_by_hand():
    truth = np.array([[1.0, 2.0], [3.0, 4.0]])
    pairs = _all_pairs(4)  # 6 pairs, all clearly ordered
    assert ordinal_depth_agreement(truth * 7, truth, pairs) == 1.0  # scale does not matter
    assert ordinal_depth_agreement(-truth, truth, pairs) == 0.0
    assert ordinal_depth_agreement(np.ones((2, 2)), truth, pairs) == 0.0  # ties are wrong
    # swapping the two bottom pixels gets exactly one pair, (2, 3), wrong
    assert ordinal_depth_agreement(np.array([[1.0, 2.0], [4.0, 3.0]]), truth, pairs) == pytest.approx(5 / 6)
    # invalid pixels and unclear pairs (depth ratio under 2%) are not counted
    truth2 = np.array([[1.0, 1.01], [np.inf, 4.0]])
    pred = np.array([[2.0, 1.0], [0.0, 5.0]])
    # left: (0,3) and (1,3); both right -> 1.0 ((0,1) is unclear, pairs with pixel 2 invalid)
    assert ordinal_depth_agreement(pred, truth2, pairs) == 1.0
    with pytest.raises(UserError, match="no pixel pair"):
        ordinal_depth_agreement(pred, np.full((2, 2), 3.0), pairs)


def test_lower_is_nearer_prior_by_hand():
    prior = lower_is_nearer((3, 2))
    assert prior.tolist() == [[3, 3], [2, 2], [1, 1]]  # depth-like: the bottom row is nearest
    floor = np.array([[9.0, 9.0], [4.0, 4.0], [1.0, 1.0]])  # a floor seen from above: the prior is right
    assert ordinal_depth_agreement(prior, floor, _all_pairs(6)) == 1.0
    ceiling = floor[::-1].copy()  # a ceiling: lower is farther, the prior is always wrong
    assert ordinal_depth_agreement(prior, ceiling, _all_pairs(6)) == 0.0


def test_random_pairs_are_distinct_pixels_and_seeded():
    a, b = random_pairs((5, 7), 1000, seed=3)
    assert (a != b).all() and a.max() < 35 and b.max() < 35
    a2, b2 = random_pairs((5, 7), 1000, seed=3)
    assert np.array_equal(a, a2) and np.array_equal(b, b2)


def test_the_motorcycle_pair_ships_with_scikit_image_and_the_prior_beats_chance():
    left, depth, valid = motorcycle_depth_order()  # bundled in the wheel: no download
    assert left.shape == (500, 741, 3) and depth.shape == (500, 741)
    assert 0.9 < valid.mean() < 0.95  # Middlebury marks ~7% of pixels unknown
    pairs = random_pairs(depth.shape, 50_000, seed=0)
    assert ordinal_depth_agreement(depth, depth, pairs, valid) == 1.0
    prior = ordinal_depth_agreement(lower_is_nearer(depth.shape), depth, pairs, valid)
    assert 0.70 < prior < 0.80  # measured 0.752 at 200,000 pairs, seed 0
