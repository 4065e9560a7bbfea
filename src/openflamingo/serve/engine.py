"""The one thread that runs the model: requests are prefilled and decoded together, as left-padded batches.

Continuous batching: between two decode steps, the waiting requests that fit (up to `max_batch_size` rows; a request
with `n` answers takes n rows sharing one prefill) are prefilled in one forward and join the running batch, and
finished ones leave at once. When the engine is idle it waits `batch_wait_s` after the first arrival so that
requests sent together start together.

No request holds up the others by more than one forward of bounded size. Bulk work runs a step at a time between
the decode steps of the running answers: a prompt longer than `prefill_chunk` tokens is prefilled alone, a chunk per
step (its KV cache and image state carried from chunk to chunk), and a scoring request runs one forward of
candidates per step, each step sized by its measured cost to take about BULK_STEP_S. While other requests are
running or waiting, bulk steps get at most `bulk_share` of the engine's time, so a request of thousands of tokens
slows the others by that share at most instead of stalling them.

Two batches run side by side, one for requests with images and one without: with images in play the gated blocks
also run their feed-forward on every token (as Flamingo computes), so a text-only request must never share a batch
with images, or its answer would change. A request's answer does not depend on the other rows: padding is masked
(and gets position ids of its own), its images' keys/values are its own, and it samples from its own RNG.
"""

from __future__ import annotations

import collections
import copy
import ctypes
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from ..model.decoding import cache_layers
from .batch import Batch
from .completion import Completion
from .sampling import Sampling, next_tokens
from .scoring import ScoreJob, ScoreTask, sized_by_cost

log = logging.getLogger("openflamingo.serve")
# A bulk step (a long prompt's prefill chunk, at most prefill_chunk tokens; a scoring call, at most score_positions)
# aims at this many seconds: a request that arrives meanwhile waits for one such step at most. The first step's size
# is a guess, the next ones follow the measured cost.
BULK_STEP_S = 0.1
FIRST_CHUNK, MIN_CHUNK = 64, 16


class QueueFull(Exception):
    """The waiting line holds --max-queue requests already."""


class EngineStopped(Exception):
    """The engine is shutting down (or died): nothing new is taken."""


def release_memory() -> None:
    """Hand freed heap memory back to the OS when a burst of requests is over. glibc keeps it otherwise (the high-water
    mark of the largest batch, and one arena per thread that touched the heap: the request handlers' worker threads
    decode images), and the server's RSS would stay at its peak for good."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


@dataclass
class Delta:
    choice: int
    text: str


@dataclass
class Finished:
    choice: int
    finish_reason: str
    completion_tokens: int


@dataclass
class Failed:
    message: str  # for the server log; clients get a generic message
    shutdown: bool = False  # the server stopped before the request was done


@dataclass
class GenerationJob:
    input_ids: list[int]
    images: torch.Tensor | None  # (1, T, 1, C, H, W) preprocessed, on the CPU
    max_tokens: int
    stop: list[str]
    sampling: list[Sampling]  # one per answer (n)
    emit: Callable[[Delta | Finished | Failed], None]  # called from the engine thread
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class Row:
    job: GenerationJob
    choice: int
    completion: Completion


class Engine:
    def __init__(
        self,
        model,
        max_batch_size: int = 16,
        batch_wait_s: float = 0.005,
        max_queue: int = 64,
        score_positions: int = 512,
        prefill_chunk: int = 256,
        bulk_share: float = 0.25,
    ):
        self.model = model
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self.max_queue = max_queue  # requests waiting for a batch row (or their turn to be scored)
        self.score_positions = score_positions  # padded candidate tokens per scoring forward
        self.prefill_chunk = prefill_chunk  # prompt tokens per prefill forward of a long prompt
        self.bulk_share = bulk_share  # of the engine's busy time, for bulk steps while others wait
        self.device = next(model.parameters()).device
        self.dtype = next(model.perceiver.parameters()).dtype
        self.stop_token_ids = set(model.stop_token_ids())
        # The model's stop strings that span several tokens (IDEFICS-instruct's <end_of_utterance>) end answers as
        # a request's own `stop` strings do.
        self.stop_texts = model.multi_token_stops()
        # Decoding on the engine thread while workers encode requests would share the tokenizer's Rust object,
        # which takes no two calls at once (see prepare.TOKENIZER_LOCK): the engine has a copy of its own.
        self.tokenizer = copy.deepcopy(model.tokenizer)
        self._queue: queue.Queue = queue.Queue()
        self._waiting: collections.deque = collections.deque()
        # Scoring requests and long prompts' prefills, a step each in turn (a prefill's rows are reserved).
        self._bulk: collections.deque[ScoreTask | PrefillTask] = collections.deque()
        # Seconds of bulk work due: other work's time earns bulk_share / (1 - bulk_share) of it, a bulk step run while
        # others wait spends its own time; never above 0, so no credit is banked for a later burst.
        self._bulk_credit = 0.0
        self._batches = {True: Batch(), False: Batch()}  # with images, without
        self._lock = threading.Lock()
        self._queued = 0  # submitted, not yet admitted to a batch or to scoring
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="openflamingo-engine", daemon=True)
        self.beat = time.monotonic()  # when the engine thread last went round its loop
        # Forwards run (for tests and the benchmark: batching means fewer of both).
        self.steps = 0  # decode steps
        self.prefills = 0  # prefill forwards
        self.score_steps = 0  # scoring forwards
        self._busy = False  # work since the engine was last idle

    # ----- called from other threads ---------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 30) -> None:
        """Stop taking work; what is still running or waiting fails with Failed(shutdown=True)."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout=timeout_s)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping.is_set()

    def stalled_for(self) -> float:
        """Seconds since the engine thread last went round its loop (it does at least every 0.1 s when idle)."""
        return time.monotonic() - self.beat

    @property
    def rows(self) -> int:
        """Answers being decoded now, or prefilled."""
        prefilling = sum(len(task.job.sampling) for task in self._bulk if isinstance(task, PrefillTask))
        return sum(len(b) for b in self._batches.values()) + prefilling

    @property
    def queued(self) -> int:
        return self._queued

    def submit(self, job: GenerationJob | ScoreJob) -> None:
        """Queue `job`; raises EngineStopped once the engine stops (or died), QueueFull at --max-queue waiting."""
        with self._lock:
            if self._stopping.is_set():
                raise EngineStopped
            if self._queued >= self.max_queue:
                raise QueueFull
            self._queued += 1
        self._queue.put(job)

    # ----- the engine thread ---------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while not self._stopping.is_set():
                    self.beat = time.monotonic()
                    try:
                        self._collect()
                        started = time.monotonic()
                        self._admit()
                        for batch in self._batches.values():
                            self._drop_cancelled(batch)
                            if batch.rows:
                                self._step(batch)
                        earned = (time.monotonic() - started) * self.bulk_share / (1 - self.bulk_share)
                        self._bulk_credit = min(0.0, self._bulk_credit + earned)
                        self._bulk_step()
                    except Exception as error:  # a bug must not leave every later request waiting forever
                        log.exception("engine step failed")
                        self._fail_running(Failed(f"{type(error).__name__}: {error}"))
        finally:
            with self._lock:
                self._stopping.set()  # submit() refuses from now on
            self._fail_running(Failed("the server stopped", shutdown=True))
            while True:
                try:
                    self._waiting.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            for job in self._waiting:
                _fail(job, Failed("the server stopped", shutdown=True))
            self._waiting.clear()

    def _fail_running(self, failure: Failed) -> None:
        for batch in self._batches.values():
            for job in {id(row.job): row.job for row in batch.rows}.values():
                _fail(job, failure)
            batch.keep([])
        for task in self._bulk:
            _fail(task.job, failure)
        self._bulk.clear()

    def _collect(self) -> None:
        """Move arrivals to the waiting line; block (briefly, to notice stop()) only when there is nothing to do."""
        if not self.rows and not self._waiting and not self._bulk:
            if self._busy:
                self._busy = False
                release_memory()
            try:
                self._waiting.append(self._queue.get(timeout=0.1))
            except queue.Empty:
                return
            self._busy = True
            deadline = time.monotonic() + self.batch_wait_s
            while (left := deadline - time.monotonic()) > 0 and len(self._waiting) < self.max_batch_size:
                try:
                    self._waiting.append(self._queue.get(timeout=left))
                except queue.Empty:
                    break
        while True:
            try:
                self._waiting.append(self._queue.get_nowait())
            except queue.Empty:
                return

    def _leave_line(self) -> GenerationJob | ScoreJob:
        with self._lock:
            self._queued -= 1
        return self._waiting.popleft()

    def _admit(self) -> None:
        """Prefill the waiting requests that fit, those with images as one left-padded batch and those without as
        another. First come, first served: a request that does not fit yet blocks later ones (no starvation of a
        large n); scoring requests start as they come and then run a step per engine iteration."""
        admitted, rows = [], self.rows
        while self._waiting:
            job = self._waiting[0]
            if job.cancelled.is_set():
                self._leave_line()
            elif isinstance(job, ScoreJob):
                self._leave_line()
                # From here on the handler's cancellation (client gone, deadline) cannot race with the result.
                if job.result.set_running_or_notify_cancel():
                    self._bulk.append(
                        ScoreTask(self.model, job, self.device, self.dtype, self.score_positions, BULK_STEP_S)
                    )
            elif len(job.sampling) > self.max_batch_size:
                _fail(
                    self._leave_line(),
                    Failed(f"n={len(job.sampling)} exceeds the batch size {self.max_batch_size}"),
                )
            elif rows + len(job.sampling) > self.max_batch_size:
                break
            else:
                rows += len(job.sampling)
                if len(job.input_ids) > self.prefill_chunk:
                    self._bulk.append(PrefillTask(self._leave_line(), self._prefill([job])))
                else:
                    admitted.append(self._leave_line())
        for with_images in (True, False):
            jobs = [job for job in admitted if (job.images is not None) == with_images]
            if not jobs:
                continue
            try:
                for _ in self._prefill(jobs):  # short prompts: one forward, no yield
                    pass
            except Exception as error:  # a failing prefill must not stop the running requests
                log.exception("prefill failed")
                for job in jobs:
                    _fail(job, Failed(f"{type(error).__name__}: {error}"))

    def _bulk_step(self) -> None:
        """One step of the oldest bulk task (then it goes to the back of the line), unless bulk work has had its
        share of the time while other requests are running or waiting."""
        if not self._bulk:
            return
        others = bool(self._waiting) or any(batch.rows for batch in self._batches.values())
        if others and self._bulk_credit < 0:
            return
        task = self._bulk.popleft()
        if task.job.cancelled.is_set():
            task.close()
            return
        started = time.monotonic()
        self.score_steps += isinstance(task, ScoreTask)  # counted first: the last step answers the request
        try:
            done = task.step()
        except Exception as error:  # the request fails, the server goes on
            log.exception("%s failed", type(task).__name__)
            _fail(task.job, Failed(f"{type(error).__name__}: {error}"))
            return
        finally:
            if others:
                self._bulk_credit -= time.monotonic() - started
        if not done:
            self._bulk.append(task)

    def _drop_cancelled(self, batch: Batch) -> None:
        """Rows of requests that were cancelled (client gone, deadline passed) leave before the next step."""
        kept = [i for i, row in enumerate(batch.rows) if not row.job.cancelled.is_set()]
        if len(kept) < len(batch):
            batch.keep(kept)

    def _prefill(self, jobs: list[GenerationJob]) -> Iterator[None]:
        """The prompts of `jobs` (all with images or all without) left-padded: in one forward when they fit
        `prefill_chunk` tokens, else in chunks sized by their cost (yielding between them); then their first tokens,
        and their rows joining the batch. Several prompts are prefilled together only when they fit one forward (no
        chunk can then be all padding)."""
        model = self.model
        with_images = jobs[0].images is not None
        length = max(len(job.input_ids) for job in jobs)
        ids = torch.full((len(jobs), length), model.special_ids.pad, dtype=torch.long)
        mask = torch.zeros((len(jobs), length), dtype=torch.long)
        for b, job in enumerate(jobs):
            ids[b, length - len(job.input_ids) :] = torch.tensor(job.input_ids)
            mask[b, length - len(job.input_ids) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        images = counts = None
        if with_images:
            counts = [job.images.shape[1] for job in jobs]
            images = torch.zeros(len(jobs), max(counts), *jobs[0].images.shape[2:])
            for b, job in enumerate(jobs):
                images[b, : counts[b]] = job.images[0]
            images = images.to(self.device, self.dtype)
        state = None
        start, size = 0, length if length <= self.prefill_chunk else min(FIRST_CHUNK, self.prefill_chunk)
        while start < length:
            end = min(start + size, length)
            began = time.monotonic()
            logits, state = model.prefill(ids[:, start:end], mask[:, start:end], images, counts, state)
            images = None  # the images come with the first chunk
            self.prefills += 1
            start = end
            if start < length:
                # The next chunk aims at BULK_STEP_S: later chunks attend to a longer cache, so cost more per token.
                took = time.monotonic() - began
                size = sized_by_cost(size, took, BULK_STEP_S, MIN_CHUNK, self.prefill_chunk)
                yield
        cache_layers(state.cache)  # refuse caches whose rows cannot be batched, before any answer starts
        answers = [len(job.sampling) for job in jobs]
        part = Batch(state=state)
        part.repeat(answers)
        part.rows = [
            Row(
                job,
                i,
                Completion(
                    self.tokenizer, [*job.stop, *self.stop_texts], self.stop_token_ids, job.max_tokens
                ),
            )
            for job in jobs
            for i in range(len(job.sampling))
        ]
        logits = logits.repeat_interleave(torch.tensor(answers, device=logits.device), dim=0)
        firsts = next_tokens(logits, [row.job.sampling[row.choice] for row in part.rows])
        kept = self._advance(part, firsts)
        part.keep(kept)
        if kept:
            self._batches[with_images].join(part)

    def _step(self, batch: Batch) -> None:
        """One token for every row of `batch`."""
        try:
            logits = self.model.decode_step(batch.state, batch.next_tokens)
        except Exception as error:
            log.exception("decode step failed")
            self._fail_batch(batch, Failed(f"{type(error).__name__}: {error}"))
            return
        self.steps += 1
        tokens = next_tokens(logits, [row.job.sampling[row.choice] for row in batch.rows])
        kept = self._advance(batch, tokens)
        if len(kept) < len(batch):
            batch.keep(kept)

    def _fail_batch(self, batch: Batch, failure: Failed) -> None:
        for row in batch.rows:
            _fail(row.job, failure)
        batch.keep([])

    def _advance(self, batch: Batch, tokens: list[int | None]) -> list[int]:
        """Hand each row's new token to its answer (a row whose sampling failed fails its request alone); records
        the tokens the rows feed next and returns the rows that continue."""
        batch.next_tokens = torch.tensor([t or 0 for t in tokens], device=self.device)
        kept = []
        for i, (row, token) in enumerate(zip(batch.rows, tokens, strict=True)):
            if token is None:
                _fail(row.job, Failed("sampling failed"))
            if row.job.cancelled.is_set():
                continue
            delta = row.completion.add(token)
            if delta:
                row.job.emit(Delta(row.choice, delta))
            if row.completion.finished:
                reason, used = row.completion.finish_reason, len(row.completion.tokens)
                row.job.emit(Finished(row.choice, reason, used))
            else:
                kept.append(i)
        return kept


@dataclass
class PrefillTask:
    """A long prompt's prefill as bulk work: `step()` runs one chunk and returns True when the prefill is over."""

    job: GenerationJob
    steps: Iterator[None]

    def step(self) -> bool:
        return next(self.steps, True) is True

    def close(self) -> None:
        self.steps.close()


def _fail(job: GenerationJob | ScoreJob, failure: Failed) -> None:
    """Tell the request's handler (once) and stop its work; the detail goes to the server log."""
    if job.cancelled.is_set():
        return
    job.cancelled.set()
    if not isinstance(job, ScoreJob):
        job.emit(failure)
    elif not job.result.done():
        job.result.set_exception(EngineStopped() if failure.shutdown else RuntimeError(failure.message))
