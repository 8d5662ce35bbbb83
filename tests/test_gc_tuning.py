import gc

import pytest

from clip_runner.gc_tuning import YOUNG_GENERATION_THRESHOLD, settle_after_loading


@pytest.fixture()
def restored_collector():
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


def test_what_was_loaded_is_frozen_and_young_collections_come_later(restored_collector):
    loaded = [{"kept": index} for index in range(1000)]  # containers the collector tracks
    assert any(item is loaded for item in gc.get_objects())
    frozen = settle_after_loading()
    # Objects only leave the frozen generation once frozen (freed or untracked, also by a
    # thread an earlier test left behind: a clean-clone run once saw one fewer right after).
    assert 0 <= frozen - gc.get_freeze_count() <= 10 and gc.get_freeze_count() >= 1000
    # Frozen objects are out of every generation's list: no collection walks them again.
    assert not any(item is loaded for item in gc.get_objects())
    assert gc.get_threshold()[0] == YOUNG_GENERATION_THRESHOLD
    made_after = [{"new": 1}]
    assert any(item is made_after for item in gc.get_objects())
