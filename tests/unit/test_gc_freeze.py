"""The workers take their start-up objects out of the cyclic collector's way."""
import gc

from streamagent.params import shipped
from streamagent.stream.runtime import freeze_gc


def test_freeze_gc_moves_live_objects_out_of_the_collectors_generations():
    assert shipped().gc_freeze  # on by default
    gc.unfreeze()
    keep = [{"n": i} for i in range(1000)]  # live containers the collector would walk
    try:
        freeze_gc()
        assert gc.get_freeze_count() >= len(keep)
        assert all(gc.get_count()[g] < 1000 for g in range(3))
    finally:
        gc.unfreeze()
