"""The warm model and its one worker thread. Requests queue up; the worker takes the first, waits a
short window for others (up to a batch cap) and answers them with the library's batched calls:
`generate` for text (the one generation engine) and `encode_images` for the head alone.

One thread owns the model, so nothing else touches it concurrently and the GPU (when there is
one) runs one batch at a time; the event loop only waits on futures.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from dxcli.base.answer import head_verdict
from dxcli.model.generate import encode_images, generate

log = logging.getLogger(__name__)
_STOP = object()


class Busy(Exception):
    """More requests are waiting than the server queues (`max_pending`)."""


@dataclass(frozen=True)
class Sampling:
    """How one request wants its answer; requests batch together only when these agree."""

    reasoning: bool
    max_new_tokens: int = 0
    temperature: float = 0.0
    top_p: float = 1.0
    n: int = 1
    seed: int | None = None


@dataclass
class Answer:
    head_prob: float
    texts: list[str] = field(default_factory=list)  # n samples; empty for the head alone
    completion_tokens: list[int] = field(default_factory=list)
    finished: list[bool] = field(default_factory=list)  # ended with EOS (else the token cap cut it)
    prompt_tokens: int = 0

    @property
    def head_verdict(self) -> str:
        return head_verdict(self.head_prob)


@dataclass
class Job:
    image: Any
    question: str
    sampling: Sampling
    future: Future = field(default_factory=Future)

    def batch_key(self) -> tuple:
        # a seeded request runs alone: its draws then depend on its own request only
        return (self.sampling, id(self) if self.sampling.seed is not None else None)


class Engine:
    def __init__(self, bundle: Any, *, max_batch: int, batch_wait_s: float, max_pending: int) -> None:
        self.bundle, self.max_batch, self.batch_wait_s = bundle, max_batch, batch_wait_s
        self.jobs: queue.Queue = queue.Queue(maxsize=max_pending)
        self.batches = 0  # generate/encode calls made: /health shows it, tests read batching from it
        self.answered = 0
        self._thread = threading.Thread(target=self._drain, name="dx-serve-model", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Answer what is queued, then end the worker (the server stops taking requests first)."""
        if self._thread.is_alive():
            self.jobs.put(_STOP)
            self._thread.join()

    def submit(self, image: Any, question: str, sampling: Sampling) -> Future:
        job = Job(image, question, sampling)
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise Busy(f"{self.jobs.maxsize} requests are already waiting") from None
        return job.future

    def _drain(self) -> None:
        while True:
            first = self.jobs.get()
            if first is _STOP:
                return
            batch, stopping = self._collect(first)
            groups: dict[tuple, list[Job]] = {}
            for job in batch:
                if job.future.set_running_or_notify_cancel():  # False: its client went away
                    groups.setdefault(job.batch_key(), []).append(job)
            for jobs in groups.values():
                self._answer(jobs)
            if stopping:
                return

    def _collect(self, first: Job) -> tuple[list[Job], bool]:
        """`first` and whatever arrives within the batching window, up to `max_batch` sequences."""
        batch, rows = [first], first.sampling.n
        deadline = time.monotonic() + self.batch_wait_s
        while rows < self.max_batch:
            try:
                job = self.jobs.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is _STOP:
                return batch, True
            batch.append(job)
            rows += job.sampling.n
        return batch, False

    def _answer(self, jobs: list[Job]) -> None:
        """One library call for jobs that agree on sampling; a failure fails those jobs only."""
        try:
            answers = self._run(jobs)
        except Exception as exc:  # noqa: BLE001 - a bug or an out-of-memory: answer 500, keep serving
            log.exception("a batch of %d request(s) failed", len(jobs))
            for job in jobs:
                job.future.set_exception(exc)
            return
        self.batches += 1
        self.answered += len(jobs)
        for job, answer in zip(jobs, answers):
            job.future.set_result(answer)

    def _run(self, jobs: list[Job]) -> list[Answer]:
        sampling, images = jobs[0].sampling, [job.image for job in jobs]
        if not sampling.reasoning:
            return [Answer(prob) for prob in encode_images(self.bundle, images)[1]]
        gen = generate(self.bundle, images, [job.question for job in jobs], max_new_tokens=sampling.max_new_tokens,
                       temperature=sampling.temperature, top_p=sampling.top_p, samples_per_image=sampling.n,
                       seed=sampling.seed)
        eos, n = self.bundle.tokenizer.eos_token_id, sampling.n
        prompt_tokens = gen.prompt_mask.sum(-1).tolist()
        answers = []
        for i, prob in enumerate(gen.head_probs):
            ids = gen.token_ids[i * n:(i + 1) * n]
            answers.append(Answer(prob, gen.texts[i * n:(i + 1) * n], [len(row) for row in ids],
                                  [bool(row) and row[-1] == eos for row in ids], int(prompt_tokens[i])))
        return answers
