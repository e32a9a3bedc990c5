"""The decode thread: one :class:`~cllm_rt.runtime.decoding.Decoder` over the running batch, requests joining
and leaving between steps, each request's text and finish reason sent back to the event loop."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import gc
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field

import torch

from ..draft_head import attached
from ..runtime.decoding import Decoder, RowsFailed
from ..runtime.drafts import SOURCES, Corpus
from ..runtime.inputs import check_model, resolve_special_tokens
from ..runtime.sampling import SamplingParams
from .metrics import Metrics
from .text import TextStream

log = logging.getLogger("cllm_rt.serve")


CORPUS_MODES = ("off", "shared", "per-key")


def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): freed memory goes back as that allocator decides
        return None


_MALLOC_TRIM = _malloc_trim()


def give_back_free_memory() -> None:
    """Return the allocator's free pages to the system once the batch is empty.

    glibc keeps what freed tensors occupied (KV caches of many batch shapes) in its arenas, so a server that
    served a burst stays at the burst's size while idle (measured with bench_faults.py: 997 MB at the start,
    ~3,250 MB under 4 clients, 3,210 MB idle afterwards, 972 MB after a trim: caching, not a leak).
    """
    if _MALLOC_TRIM is not None:
        gc.collect()  # the KV cache and its layers point at each other: only the collector frees them
        _MALLOC_TRIM(0)


class Unavailable(Exception):
    """The engine takes no request now: it is shutting down, or broken."""


class Overloaded(Unavailable):
    """Every row decodes and the queue is full."""


class _NoCorpus(Corpus):
    """The corpus of ``corpus="off"``: it learns nothing (the Decoder adds every finished output to its
    corpus, and a process-wide default corpus would keep them)."""

    def add(self, tokens: list[int]) -> None:
        pass


@dataclass
class Generation:
    """One request in flight: what the decode thread needs, and the events it sends back to the event loop."""

    handle: int
    prompt: list[int]
    max_tokens: int
    text: TextStream
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    arrived: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    tokens: int = 0
    finish_reason: str | None = None
    sampling: SamplingParams | None = None  # None: greedy
    tenant: int | None = None  # the API key it came with (its index), for corpus="per-key"

    def send(self, *event) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is listening any more
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def feed(self, new: list[int], finished: bool, eos: set[int]) -> bool:
        """Take newly final tokens (decode thread); True once the generation is done."""
        for token in new:
            self.tokens += 1
            if token in eos:  # not part of the text, as in OpenAI's API
                self.finish_reason = "stop"
                break
            if self.text.push(token):
                self.finish_reason = "stop"
                break
        else:
            if finished:
                self.finish_reason = "length"
        if self.finish_reason is not None:
            self.text.flush()
        delta = self.text.take(final=self.finish_reason is not None)
        if delta:
            self.send("text", delta)
        if self.finish_reason is not None:
            self.send("done", self.finish_reason)
        return self.finish_reason is not None


class Engine:
    """The decode thread and its queue: :meth:`submit` from the event loop, events come back on each
    generation's queue. At most ``max_batch`` rows decode together and ``max_queue`` requests wait.

    ``corpus``: where the "corpus" draft source comes from. ``"off"`` (the default): no corpus, so nothing one
    client sent or received can speed up, or be timed by, another. ``"shared"``: one corpus of every earlier
    answer, for every client (faster on repeated content; chunk sizes and timing then tell a client whether
    others asked something similar). ``"per-key"``: one corpus per API key (a request's ``tenant``), so that
    clients sharing a key share drafts and no key's text shows in another's timing. The settings are checked
    here, so a bad one stops the server at start-up.
    """

    def __init__(self, model, tokenizer, *, block_size: int = 16, drafts="auto", corpus: str = "off",
                 max_batch: int = 16, max_queue: int = 64, metrics: Metrics | None = None):
        check_model(model)
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch} and {max_queue}")
        if corpus not in CORPUS_MODES:
            raise ValueError(f"corpus must be one of {list(CORPUS_MODES)}, got {corpus!r}")
        self.model, self.tokenizer = model, tokenizer
        if corpus == "off" and drafts is not None:
            names = SOURCES if drafts == "auto" else (drafts,) if isinstance(drafts, str) else tuple(drafts)
            # "auto" uses a draft head only where one is attached, as the Decoder's own "auto" does
            dropped = {"corpus"} | ({"head"} if drafts == "auto" and attached(model) is None else set())
            drafts = tuple(name for name in names if name not in dropped)
        self.corpus = Corpus() if corpus == "shared" else _NoCorpus()  # kept across Decoders
        self.per_key = corpus == "per-key"
        self.corpora: dict[int | None, Corpus] = {}  # per-key: one per tenant, kept across Decoders
        self.decoder_options = dict(block_size=block_size, drafts=drafts, corpus=self.corpus)
        self.eos = set(resolve_special_tokens(model)[0])
        Decoder(model, eos=self.eos, **self.decoder_options)  # its own checks of the settings, now
        self.max_batch, self.max_queue = max_batch, max_queue
        self.metrics = metrics or Metrics()
        self.broken: str | None = None  # why the decode thread stopped for good
        self.generated = 0  # tokens generated for requests, in all
        self._lock = threading.Condition()
        self._waiting: collections.deque[Generation] = collections.deque()
        self._cancelled: set[int] = set()
        self._active: dict[int, Generation] = {}  # the decode thread's own
        self._in_flight = 0
        self._row_steps = self._accepted = 0  # over every Decoder this engine ran: tokens per forward
        self._handles = itertools.count()
        self._closing = False
        self._thread = threading.Thread(target=self._serve, name="cllm_rt-decode", daemon=True)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def running(self) -> int:
        return len(self._active)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Stop the decode thread; requests still in flight get an error event."""
        with self._lock:
            self._closing = True
            self._lock.notify()
        if self._thread.is_alive():
            self._thread.join()
        with self._lock:
            for generation in self._waiting:
                generation.send("error", "the server is shutting down")
            self._in_flight -= len(self._waiting)
            self._waiting.clear()

    def submit(self, prompt: list[int], max_tokens: int, stop: list[str], sampling: SamplingParams | None = None,
               tenant: int | None = None) -> Generation:
        """Queue a generation (event loop thread); raises :class:`Unavailable` at once when it cannot.
        ``tenant``: who sent it (the index of its API key), for ``corpus="per-key"``."""
        generation = Generation(next(self._handles), prompt, max_tokens, TextStream(self.tokenizer, stop),
                                asyncio.get_running_loop(), sampling=sampling, tenant=tenant)
        with self._lock:
            if self.broken is not None:
                raise Unavailable(self.broken)
            if self._closing:
                raise Unavailable("the server is shutting down")
            if self._in_flight >= self.max_batch + self.max_queue:
                raise Overloaded(f"{self.max_batch} requests decoding and {self.max_queue} waiting; retry later")
            self._in_flight += 1
            self._waiting.append(generation)
            self.metrics.queue_depth.set(len(self._waiting))
            self._lock.notify()
        return generation

    def cancel(self, generation: Generation) -> None:
        """The client went away: drop the request from the queue, or its row from the batch (no-op once done)."""
        with self._lock:
            if generation in self._waiting:
                self._waiting.remove(generation)
                self._in_flight -= 1
                self.metrics.queue_depth.set(len(self._waiting))
            elif generation.handle in self._active:
                self._cancelled.add(generation.handle)

    def _serve(self) -> None:
        while True:
            with self._lock:
                self._lock.wait_for(lambda: self._waiting or self._closing)
                if self._closing:
                    return
            try:
                # a Decoder per busy period: the model runs the runtime's attention only while it decodes
                decoder = Decoder(self.model, eos=self.eos, **self.decoder_options)
                decoder.__enter__()
            except Exception:  # noqa: BLE001  no decoder, no decoding: say so instead of retrying forever
                log.exception("the decoder could not be built; the server cannot decode")
                self._break("the server's decoder could not be built (see the server log); restart the server")
                return
            try:
                with torch.inference_mode():
                    self._decode(decoder)
            except Exception as error:  # noqa: BLE001  a failed step fails its requests, never the server
                log.exception("decoding failed")
                self._fail(list(self._active), client_message(error))
            finally:
                decoder.__exit__(None, None, None)
                del decoder  # its cache can go now, so the trim below can hand its pages back
                give_back_free_memory()

    def _decode(self, decoder: Decoder) -> None:
        """Step the batch until no row is left, letting requests join and leave between steps."""
        seen_steps = seen_tokens = 0
        while True:
            joining = self._admit(decoder)
            if joining:
                self._join(decoder, joining)
            if not self._active:
                return
            events = decoder.emit()  # before the next forward: a first token right after its prefill
            now = time.perf_counter()
            done = []
            for handle, new, finished in events:
                generation = self._active[handle]
                if new and generation.first_token is None:
                    generation.first_token = now
                    self.metrics.ttft.observe(now - generation.arrived)
                before = generation.tokens
                if generation.feed(new, finished, self.eos):
                    done.append(generation)
                    if not finished:  # a stop string: the runtime does not know it is done
                        decoder.remove(handle)
                self.metrics.generation_tokens.inc(generation.tokens - before)
                self.generated += generation.tokens - before
            with self._lock:
                for generation in done:
                    del self._active[generation.handle]
                self._in_flight -= len(done)
                self.metrics.running.set(len(self._active))
            for generation in done:
                self.metrics.finished(generation)
            if not decoder.rows:
                continue  # every row just finished or stopped: no forward to run or count
            try:
                decoder.decode()
            except RowsFailed as failed:  # those rows left the batch; the others took their step
                log.warning("decoding failed for %d of %d rows: %s", len(failed.errors),
                            len(decoder.rows) + len(failed.errors), failed)
                for handle, error in failed.errors.items():
                    self._fail([handle], client_message(error))
            histogram = decoder.stats.accepted_histogram
            steps, tokens = sum(histogram), sum(k * c for k, c in enumerate(histogram))
            self.metrics.forwards.inc()
            self.metrics.row_steps.inc(steps - seen_steps)
            self.metrics.accepted.inc(tokens - seen_tokens)
            self._row_steps += steps - seen_steps
            self._accepted += tokens - seen_tokens
            if self._row_steps:  # zero while every row that stepped so far has failed
                self.metrics.tokens_per_forward.set(self._accepted / self._row_steps)
            seen_steps, seen_tokens = steps, tokens

    def _corpus_of(self, tenant: int | None) -> Corpus:
        """corpus="per-key": the tenant's corpus, made at its first request."""
        if tenant not in self.corpora:
            self.corpora[tenant] = Corpus()
        return self.corpora[tenant]

    def _join(self, decoder: Decoder, joining: list[Generation]) -> None:
        """Prefill the joining requests in one forward. The Decoder checks and, if their group prefill fails,
        prefills each row alone, so only a request that cannot be decoded by itself fails; the others join."""
        try:
            corpora = [self._corpus_of(g.tenant) for g in joining] if self.per_key else None
            decoder.add([g.prompt for g in joining], [g.max_tokens for g in joining], [g.handle for g in joining],
                        [g.sampling for g in joining], corpora)
        except RowsFailed as failed:
            for handle, error in failed.errors.items():
                log.warning("a request could not join the batch: %s", error)
                alone = isinstance(error, (ValueError, NotImplementedError))  # the checks of this request alone
                self._fail([handle], f"this request cannot be decoded: {error}" if alone else client_message(error))
        joined = [g for g in joining if g.handle in self._active]
        self.metrics.prompt_tokens.inc(sum(len(g.prompt) for g in joined))

    def _fail(self, handles, message: str) -> None:
        """End these rows' requests with an error event."""
        with self._lock:
            for handle in handles:
                generation = self._active.pop(handle, None)
                if generation is not None:
                    generation.send("error", message)
                    self._in_flight -= 1
            self.metrics.running.set(len(self._active))

    def _break(self, reason: str) -> None:
        with self._lock:
            self.broken = reason
            for generation in [*self._active.values(), *self._waiting]:
                generation.send("error", reason)
            self._in_flight = 0
            self._active.clear()
            self._waiting.clear()
            self.metrics.running.set(0)
            self.metrics.queue_depth.set(0)

    def _admit(self, decoder: Decoder) -> list[Generation]:
        """Apply cancellations; move waiting requests into the batch while rows are free."""
        with self._lock:
            if self._closing:
                for generation in self._active.values():
                    generation.send("error", "the server is shutting down")
                self._in_flight -= len(self._active)
                self._active.clear()
            for handle in self._cancelled:
                if self._active.pop(handle, None) is not None:
                    decoder.remove(handle)
                    self._in_flight -= 1
            self._cancelled.clear()
            joining = []
            while self._waiting and not self._closing and len(self._active) < self.max_batch:
                generation = self._waiting.popleft()
                self._active[generation.handle] = generation
                joining.append(generation)
            self.metrics.queue_depth.set(len(self._waiting))
            self.metrics.running.set(len(self._active))
        now = time.perf_counter()
        for generation in joining:
            self.metrics.queue_time.observe(now - generation.arrived)
        return joining


def client_message(error: Exception) -> str:
    """What a client may read about a failure of its own request: its kind, never other rows' values or the
    server's internals (those go to the server log)."""
    if isinstance(error, FloatingPointError):
        return "the model produced NaN for this request; greedy decoding is undefined"
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        return "out of memory while decoding this request; retry with a shorter prompt or max_tokens"
    return "decoding failed (see the server log)"
