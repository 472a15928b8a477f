"""Three-step batch pipelines whose file work runs beside the model: ``load`` the next batch and
``write`` the last one in threads while the caller's thread runs the model on the current one.

The model (torch, onnxruntime), Pillow's codecs and zlib release the GIL while they work, so
decoding, PNG encoding and the model overlap instead of taking turns; the cores never wait on a file.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

Item = TypeVar("Item")
Loaded = TypeVar("Loaded")
Ran = TypeVar("Ran")
Written = TypeVar("Written")


def pipelined(
    items: Sequence[Item],
    load: Callable[[Item], Loaded],
    run: Callable[[Loaded], Ran],
    write: Callable[[Ran], Written],
) -> Iterator[Written]:
    """Yield ``write(run(load(item)))`` for each item, in order.

    ``load`` runs one item ahead in a thread, ``write`` one item behind in another, ``run`` in the
    caller's thread; so at most three items are in memory at once. The result of item k is yielded
    after ``run`` of item k + 1 and before ``write`` of item k + 1 starts: a consumer that stops
    (raises, or closes the generator: use ``contextlib.closing``) leaves nothing written after the
    last result it saw. An exception in any step is raised here, in order, after the threads stop.
    """
    if not items:
        return
    with ThreadPoolExecutor(1, "covidseg-load") as loader, ThreadPoolExecutor(1, "covidseg-write") as writer:
        loading: Future | None = loader.submit(load, items[0])
        writing: Future | None = None
        for k in range(len(items)):
            loaded = loading.result()
            loading = loader.submit(load, items[k + 1]) if k + 1 < len(items) else None
            ran = run(loaded)
            if writing is not None:
                yield writing.result()
            writing = writer.submit(write, ran)
        yield writing.result()
