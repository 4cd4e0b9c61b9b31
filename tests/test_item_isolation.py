"""One bad item never stops a batch job: a failed refinement or forward fails that item alone, locally and on Ray."""

from __future__ import annotations

from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from types import SimpleNamespace

import numpy as np
import pytest

from wsss.data.datasets import Sample
from wsss.runtime import labeler
from wsss.runtime.labeler import Failure, LabelConfig, Times


def _sample(item_id: str) -> Sample:
    return Sample(item_id, np.zeros((4, 4, 3), np.uint8), None, None)


def _raising(err: BaseException) -> Future:
    future = Future()
    future.set_exception(err)
    return future


def test_a_failed_refinement_fails_its_item_with_the_reason(tmp_path) -> None:
    record, _ = labeler._finish(tmp_path, _sample("a"), _raising(ValueError("degenerate image")), None,
                                LabelConfig(), ("background", "x"), overlay=False)  # fmt: skip
    assert record == {"id": "a", "status": "failed", "reason": "ValueError: degenerate image"}
    assert not any(tmp_path.iterdir())  # nothing written for it


def test_a_dead_refinement_pool_stops_the_run(tmp_path) -> None:
    with pytest.raises(BrokenProcessPool):  # every later item would fail alike: stop, --resume continues
        labeler._finish(tmp_path, _sample("a"), _raising(BrokenProcessPool("worker died")), None, LabelConfig(),
                        ("background", "x"), overlay=False)  # fmt: skip


def test_a_ray_replica_retries_a_failing_chunk_item_by_item(monkeypatch) -> None:
    cluster = pytest.importorskip("wsss.runtime.cluster")

    def forward(backend, spec, samples, cfg, crf, overlay_ids, times):
        if any(s.id == "bad" for s in samples):
            raise RuntimeError("input of 1 x 1 pixels")
        return [f"res-{s.id}" for s in samples], [f"label-{s.id}" for s in samples], [False] * len(samples)

    monkeypatch.setattr(cluster, "forward_chunk", forward)
    replica = SimpleNamespace(backend=None, spec=None, cfg=LabelConfig(), crf=None, overlay_ids=set())
    replica._isolating = lambda samples, times: cluster._Replica._isolating(replica, samples, times)
    samples, results, labels, overlays, failed = replica._isolating([_sample(i) for i in ["a", "bad", "c"]], Times())
    assert [s.id for s in samples] == ["a", "c"] and results == ["res-a", "res-c"] and labels == ["label-a", "label-c"]
    assert failed == [Failure("bad", "RuntimeError: input of 1 x 1 pixels")]
