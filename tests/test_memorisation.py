"""Memorisation figures on constructed data: a copying generator is told apart from one that samples."""

import pytest
import torch

from skipdiff.eval.memorisation import memorisation_statistics, nearest_distances


def test_nearest_distances_equal_a_brute_force_search_and_leave_one_out_skips_itself():
    torch.manual_seed(0)
    queries, references = torch.randn(50, 7), torch.randn(80, 7)
    distances, indices = nearest_distances(queries, references, chunk=16)
    brute = torch.cdist(queries.double(), references.double())
    assert torch.allclose(distances, brute.min(dim=1).values) and torch.equal(indices, brute.argmin(dim=1))
    own, own_index = nearest_distances(references, references, exclude_self=True, chunk=16)
    assert (own > 0).all() and not torch.equal(own_index, torch.arange(80))


def test_a_copying_generator_has_a_high_copy_rate_and_a_sampling_one_does_not():
    torch.manual_seed(0)
    population = torch.randn(3000, 8)
    train, test, fresh = population[:1000], population[1000:1500], population[1500:2000]
    copies = train[torch.randint(0, 1000, (500,))] + 1e-3 * torch.randn(500, 8)
    copying = memorisation_statistics(copies, train, test)
    sampling = memorisation_statistics(fresh, train, test)
    assert copying["copy_rate"]["below_q01_of_test_to_train"] > 0.9
    assert sampling["copy_rate"]["below_q01_of_test_to_train"] < 0.05
    assert copying["ratio_median_generated_to_train_over_test_to_train"] < 0.01
    assert 0.8 < sampling["ratio_median_generated_to_train_over_test_to_train"] < 1.25


def test_the_equal_size_train_reference_is_a_fixed_subset_as_large_as_asked():
    from skipdiff.eval.memorisation import equal_size_indices

    first, again = equal_size_indices(1437, 360), equal_size_indices(1437, 360)
    assert torch.equal(first, again) and len(first) == 360 and len(set(first.tolist())) == 360
    assert int(first.min()) >= 0 and int(first.max()) < 1437 and not torch.equal(first, torch.arange(360))
    with pytest.raises(ValueError, match="400 of 360 train images"):
        equal_size_indices(360, 400)
