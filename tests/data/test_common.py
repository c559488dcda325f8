"""Helpers of the data stages: the streamed worker map."""

from __future__ import annotations

from collections.abc import Iterator

from llama_pipe.data.common import stream_map


def _double(batch: list[int]) -> list[int]:
    return [2 * x for x in batch]


def test_stream_map_keeps_order_and_reads_the_input_as_results_are_taken() -> None:
    for workers in (1, 2):
        pulled = 0

        def batches() -> Iterator[list[int]]:
            nonlocal pulled
            for i in range(200):
                pulled += 1
                yield [i, i + 1]

        used, results = stream_map(_double, batches(), workers, batch=2)
        assert used == workers
        first = next(results)
        assert first == [0, 2]
        assert pulled <= 4 * workers + 1  # the batches in flight, not the input
        assert [first, *results] == [[2 * i, 2 * i + 2] for i in range(200)]


def test_stream_map_uses_one_process_for_a_short_input() -> None:
    used, results = stream_map(_double, iter([[1, 2], [3]]), 2, batch=2)
    assert used == 1 and list(results) == [[2, 4], [6]]
