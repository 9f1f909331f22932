"""The demo build's torch threads: every core the machine leaves idle, at least one, MILLM_TORCH_THREADS first."""

import torch

from catalog.demo import _demo_build_threads, build_threads


def test_build_threads_take_the_idle_cores():
    assert build_threads(cores=2, busy_cores=0.1) == 2  # a quiet laptop: both cores
    assert build_threads(cores=2, busy_cores=0.9) == 1
    assert build_threads(cores=2, busy_cores=5.0) == 1  # never fewer than one
    assert build_threads(cores=16, busy_cores=3.2) == 13


def test_a_build_uses_the_set_threads_and_restores_them(tmp_path, settings):
    before = torch.get_num_threads()
    settings.TORCH_THREADS = 3 if before != 3 else 2
    with _demo_build_threads(tmp_path, force=False):  # nothing cached there: a build would run
        assert torch.get_num_threads() == settings.TORCH_THREADS
    assert torch.get_num_threads() == before
