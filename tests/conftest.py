import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True)
def one_thread(request):
    """Tiny models run fastest on one CPU thread (thread syncs cost more than their matmuls,
    badly so on a busy machine); tests on the real backbone keep the default."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
