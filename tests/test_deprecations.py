"""Deprecated names: they still resolve to the renamed objects, and warn on use."""

from __future__ import annotations

import pytest

from mtl_optim import aggregators

RENAMED = {
    "RowWeighting": aggregators.WeightedAggregator,
    "GramianWeighting": aggregators.GramianWeightedAggregator,
}


@pytest.mark.parametrize("old", sorted(RENAMED))
def test_old_aggregator_base_names_warn_and_resolve(old):
    new = RENAMED[old]
    message = rf"aggregators\.{old} is deprecated.*aggregators\.{new.__name__}"
    with pytest.warns(DeprecationWarning, match=message):
        assert getattr(aggregators, old) is new
    namespace: dict = {}
    with pytest.warns(DeprecationWarning, match=message):  # the from-import form warns too
        exec(f"from mtl_optim.aggregators import {old} as alias", namespace)
    assert namespace["alias"] is new
    assert old not in aggregators.__all__ and new.__name__ in aggregators.__all__


def test_old_names_keep_their_meaning():
    """Every Gramian-weighted aggregator is a weighted aggregator, as before the rename."""
    assert issubclass(aggregators.GramianWeightedAggregator, aggregators.WeightedAggregator)
    assert isinstance(aggregators.NashMTL(), aggregators.GramianWeightedAggregator)
    assert not isinstance(aggregators.ExcessMTL(), aggregators.GramianWeightedAggregator)
    assert isinstance(aggregators.ExcessMTL(), aggregators.WeightedAggregator)


def test_unknown_names_still_raise_attribute_error():
    with pytest.raises(AttributeError, match="has no attribute 'Weighting'"):
        _ = aggregators.Weighting
