"""The engine: many streaming sessions over one paged KV pool, served tick by tick.

``tick()`` takes the pending micro-turn of every live session and

1. **prefills** their inputs (laid out by :func:`tml.stream.layout` at append time) as
   one batched call ``model(chunk, cache=PagedKVCache, n_new=n)`` — several calls if an
   input is longer than ``max_prefill_chunk``;
2. **decodes** their outputs token by token, all sessions together (one call per step,
   ``n_new`` 1 for a session still decoding, 0 for one that has fed its ``<end>``),
   each choice constrained by the output grammar (:mod:`tml.sampler.grammar`) and made
   counter-based on the host (:mod:`tml.sampler.sampling`);
3. **commits** each session's micro-turn (inputs and outputs as a
   :class:`~tml.stream.MicroTurn`) and gives back the pages it reserved but did not use.

After ``<speak>`` each of the 4 ``<speech>`` positions gets a frame sampled from the
previous position's speech logits (80 independent 16-way choices) and that frame is the
position's dMel input (teacher forcing, as in training). Every reported log-prob is the
model's unconstrained one, computed as :func:`tml.model.loss.token_logprobs` computes it
(``kernels.log_softmax`` of the float32 logits), so it equals :func:`tml.sampler.score`'s
bit for bit in ``batch_invariant`` mode.

**Shape buckets.** Batch sizes, chunk lengths and patch counts are rounded up to small
fixed sets (``batch_buckets``, ``chunk_buckets``, ``patch_buckets``), so the compiled
programs are reused tick after tick; the weights are an argument of the compiled
program, so :meth:`Engine.set_params` swaps them without recompiling
(:meth:`Engine.compiled_programs` counts them). The pool — one array per layer and per
k/v (:class:`~tml.model.kv_cache.PagedKVCache`) — is donated to each call and written in
place (the compiled program aliases each pool input to its output), so a call costs what
its chunk and the visible keys cost, not what the pool holds.

**Pages.** ``append`` reserves the pages for the micro-turn's inputs plus the output
budget (``max_output_tokens``), all or nothing, so capacity and pool exhaustion are
errors of that ``append`` only; a tick never allocates. Padding rows of a bucketed
batch point at the reserved page and write nowhere.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tml import kernels
from tml.audio import waveform_from_dmel
from tml.model.config import ModelConfig
from tml.model.kv_cache import PagedKVCache
from tml.model.model import InteractionModel
from tml.sampler.grammar import DONE, SPEECH, OutputGrammar
from tml.sampler.pages import PagePool
from tml.sampler.sampling import STREAM_SPEECH, STREAM_TOKEN, SamplingParams, choose, uniforms
from tml.sampler.score import speech_frame_logprob
from tml.sampler.session import Pending, Session, TurnInputs, TurnOutput, check_inputs
from tml.stream import MicroTurn, Modality, layout
from tml.stream.layout import PATCH_SHAPE
from tml.stream.micro_turns import FRAMES_PER_MICRO_TURN, N_MELS
from tml.text import CONTROL_ACTIONS, ByteTokenizer, Tokenizer


class SessionError(LookupError):
    """An unknown or closed session id."""


def bucket(n: int, buckets: tuple[int, ...], what: str) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"{n} {what} exceed the largest bucket {buckets[-1]}: build the engine with larger buckets")


class _NoVideo:
    """Stands in for the hMLP encoder in calls whose chunk holds no patch (every decode
    call): zeros [N, d_model]. The model selects a patch embedding only at ``VIDEO``
    positions (``jnp.where``), so the zeros are never read and no bit changes
    (``tests/sampler/test_alignment.py`` decodes with it). Measured on the loaded 2-core
    CPU (tiny, batch_invariant): the encoder over the one dummy patch slot per row cost
    ~17-19 ms per call on its own (1-16 rows), against ~12-44 ms for a whole decode call."""

    def __init__(self, d_model: int):
        self.d_model = d_model

    def __call__(self, pix):
        return jnp.zeros((pix.shape[0], self.d_model), pix.dtype)


def _advance(graphdef, state, k, v, table, lengths, chunk, n_new, video=True):
    """One batched call: the chunk appended to each row's pages → (log-probs of the last
    real position: text [B, V] and speech [B, n_mels, n_bins], the pools: k, v tuples of
    n_layers [n_pages, page_size, Hkv, hd], donated and written in place). ``video``
    (static) False: the chunk has no patch, skip the video encoder (:class:`_NoVideo`)."""
    model = nnx.merge(graphdef, state)
    if not video:
        object.__setattr__(model, "hmlp", _NoVideo(model.cfg.d_model))
    out = model(chunk, cache=PagedKVCache(k, v, table, lengths), n_new=n_new)
    last = jnp.maximum(n_new - 1, 0)
    text = jnp.take_along_axis(out.text_logits, last[:, None, None], axis=1)[:, 0]
    speech = jnp.take_along_axis(out.speech_logits, last[:, None, None, None], axis=1)[:, 0]
    lp_text = kernels.log_softmax(text.astype(jnp.float32))
    lp_speech = kernels.log_softmax(speech.astype(jnp.float32))
    return lp_text, lp_speech, out.cache.k, out.cache.v


_PROGRAMS: list[tuple[object, object]] = []  # (graphdef, jitted _advance): engines of one model share programs


def _program(graphdef):
    """The jitted model call for this architecture, shared by every engine built on it
    (a GraphDef compares by value but is not hashable)."""
    for g, fn in _PROGRAMS:
        if g == graphdef:
            return fn
    fn = jax.jit(functools.partial(_advance, graphdef), donate_argnums=(1, 2), static_argnames=("video",))
    _PROGRAMS.append((graphdef, fn))
    return fn


def _compile_frame_sum() -> None:
    """Compile :func:`~tml.sampler.score.speech_frame_logprob` on a frame's [80] channel
    log-probs in every kernel mode now (the mode is part of jit's cache key), so a
    session's first speaking micro-turn does not compile it in the middle of a tick.
    Once per process: later calls hit jit's cache."""
    for m in kernels.MODES:
        with kernels.kernel_mode(m):
            speech_frame_logprob(np.zeros(N_MELS, np.float32))


def _tensor_parallel(mesh):
    """None, a Mesh or a TensorParallel → TensorParallel | None."""
    if mesh is None:
        return None
    from tml.parallel import TensorParallel

    return mesh if isinstance(mesh, TensorParallel) else TensorParallel(mesh)


class Engine:
    """Streaming sessions served in ticks; see the module docstring.

    Args:
        model: an :class:`~tml.model.InteractionModel` (its weights are used unless
            ``params`` is given), or a :class:`~tml.model.config.ModelConfig` with ``params``.
        params: the model's ``nnx.State`` (``nnx.split(model)[1]``).
        max_sessions: live sessions at once (a tick batches at most this many).
        page_size: KV slots per page (a multiple of :data:`tml.kernels.SPLIT_SIZE`).
        max_context: KV slots one session may hold (rounded up to whole pages).
        n_pages: pages in the pool (default: every session at ``max_context``, plus the
            reserved page).
        sampling: default :class:`SamplingParams` (``open`` may override).
        max_output_tokens: output budget of a micro-turn, ``<end>`` included (>= 2;
            >= 6 lets the model speak).
        max_text_bytes: text bytes allowed per micro-turn (None: only the budget limits
            them; 0: a speech-only agent).
        batch_buckets, chunk_buckets, patch_buckets: the compiled shapes.
        max_prefill_chunk: longest prefill call (default the largest chunk bucket).
        vocoder: vocode speech frames with Griffin–Lim (:func:`tml.audio.waveform_from_dmel`).
        mesh: serve tensor-parallel on this mesh (a ``jax.sharding.Mesh`` with a
            ``tensor`` axis, or a :class:`tml.parallel.TensorParallel` for other rules /
            the two-shot reduction): weights sharded by :func:`tml.parallel.invariant_rules`,
            log-probs bitwise those of one device (tests/sampler/test_tp_alignment.py).
    """

    def __init__(self, model: InteractionModel | ModelConfig, params: nnx.State | None = None, *,
                 max_sessions: int = 8, page_size: int = kernels.SPLIT_SIZE, max_context: int = 4096,
                 n_pages: int | None = None, sampling: SamplingParams = SamplingParams(),
                 max_output_tokens: int = 16, max_text_bytes: int | None = None, batch_buckets: tuple[int, ...] | None = None,
                 chunk_buckets: tuple[int, ...] = (16, 32, 64), patch_buckets: tuple[int, ...] = (1, 4, 16),
                 max_prefill_chunk: int | None = None, vocoder: bool = True,
                 tokenizer: Tokenizer = ByteTokenizer(), mesh=None):
        if isinstance(model, ModelConfig):
            if params is None:
                raise ValueError("Engine(ModelConfig) needs params= (nnx.split(model)[1] of a trained model)")
            model = nnx.eval_shape(lambda: InteractionModel(model, rngs=nnx.Rngs(0)))
        self.graphdef, state = nnx.split(model)
        self.cfg: ModelConfig = model.cfg
        self._tp = _tensor_parallel(mesh)
        self.state = state if self._tp is None or params is not None else self._tp.place(state)
        if params is not None:
            self.set_params(params)
        self.tokenizer, self.sampling = tokenizer, sampling.validate()
        OutputGrammar(tokenizer, max_output_tokens, max_text_bytes)  # validates the budget
        self.max_output_tokens, self.max_text_bytes, self.vocoder = max_output_tokens, max_text_bytes, vocoder
        self.max_sessions = max_sessions
        self.batch_buckets = tuple(batch_buckets or [1 << i for i in range(max(max_sessions - 1, 0).bit_length() + 1)])
        if self.batch_buckets[-1] < max_sessions:
            raise ValueError(f"batch_buckets {self.batch_buckets} must reach max_sessions={max_sessions}")
        self.chunk_buckets, self.patch_buckets = tuple(chunk_buckets), tuple(patch_buckets)
        self.max_prefill_chunk = max_prefill_chunk or self.chunk_buckets[-1]
        pages_per_session = -(-max_context // page_size)
        n_pages = n_pages or max_sessions * pages_per_session + 1
        self.pool = PagePool(n_pages, page_size, pages_per_session)
        self.k, self.v = PagedKVCache.empty_pool(self.cfg, n_pages, page_size, self.cfg.compute_dtype())
        if self._tp is not None:
            self.k, self.v = self._tp.replicate((self.k, self.v))
        self._advance = _program(self.graphdef)
        _compile_frame_sum()
        self._sessions: dict[int, Session] = {}
        self._next_id = 0

    # ------------------------------------------------------------------- pool
    @property
    def kv_dtype(self):
        """The pool's dtype (the model's compute dtype)."""
        return self.k[0].dtype

    def read_pages(self, pages) -> tuple[np.ndarray, np.ndarray]:
        """The raw contents of pool pages (int [n]) → k, v [n_layers, n, page_size, Hkv, hd]."""
        idx = np.asarray(pages, np.int32)
        get = lambda pools: np.stack([np.asarray(jax.device_get(p[idx])) for p in pools])
        return get(self.k), get(self.v)

    def write_pages(self, pages, k: np.ndarray, v: np.ndarray) -> None:
        """k, v [n_layers, n, page_size, Hkv, hd] (the pool's dtype) into pool pages (int [n])
        (:meth:`restore`; between ticks)."""
        idx = jnp.asarray(np.asarray(pages, np.int32))
        if k.shape != v.shape or len(k) != len(self.k) or k.shape[2:] != self.k[0].shape[1:] or len(k[0]) != len(idx):
            raise ValueError(f"write_pages: k {k.shape}, v {v.shape} must be [n_layers={len(self.k)}, "
                             f"{len(idx)} pages, *{self.k[0].shape[1:]}]")
        self.k = tuple(p.at[idx].set(jnp.asarray(x, p.dtype)) for p, x in zip(self.k, k))
        self.v = tuple(p.at[idx].set(jnp.asarray(x, p.dtype)) for p, x in zip(self.v, v))

    # ------------------------------------------------------------------ weights
    def set_params(self, params: nnx.State | InteractionModel) -> None:
        """Swap the weights of the running engine (same structure, shapes and dtypes);
        no recompilation: they are an argument of the compiled programs."""
        if isinstance(params, nnx.Module):
            params = nnx.split(params)[1]
        old = jax.tree_util.tree_structure(self.state)
        if jax.tree_util.tree_structure(params) != old:
            raise ValueError("set_params: the new state's structure differs from the model's: pass "
                             "nnx.split(model)[1] of the same architecture")
        for a, b in zip(jax.tree_util.tree_leaves(self.state), jax.tree_util.tree_leaves(params)):
            if a.shape != b.shape or a.dtype != b.dtype:
                raise ValueError(f"set_params: a weight of shape {b.shape} {b.dtype} replaces {a.shape} {a.dtype}")
        self.state = params if self._tp is None else self._tp.place(params)

    def weights_digest(self) -> str:
        """sha256 of the current weights (cached per ``set_params``): what a snapshot
        records so it is only restored onto the weights that computed its KV pages."""
        if getattr(self, "_digest", (None,))[0] is not self.state:
            from tml.sampler.snapshot import weights_digest
            self._digest = (self.state, weights_digest(self.state))
        return self._digest[1]

    def snapshot(self, directory) -> None:
        """Save every live session (between ticks) into ``directory``; :meth:`restore` in a
        new engine continues them bit for bit (:mod:`tml.sampler.snapshot`)."""
        from tml.sampler import snapshot
        snapshot.save(self, directory)

    def restore(self, directory) -> list[int]:
        """Load a :meth:`snapshot` into this engine (which serves no sessions) → the ids."""
        from tml.sampler import snapshot
        return snapshot.restore(self, directory)

    def compiled_programs(self) -> int:
        """How many programs the model call has compiled (one per shape bucket, kernel
        mode and dtype in use; shared by the engines of one architecture)."""
        return self._advance._cache_size()

    def call_args(self, batch: int, chunk: int, n_patches: int = 1) -> tuple:
        """The arguments of one model call of shape bucket (batch, chunk, n_patches) — the
        weights, the pools, an all-padding chunk (``n_new`` 0: it writes nowhere) — in the
        order the compiled program takes them: ``(state, k, v, table, lengths, chunk, n_new)``.
        For :meth:`lower` and ``jax.export`` (``tests/sampler/test_export.py``)."""
        B = bucket(batch, self.batch_buckets, "sessions")
        T = bucket(chunk, self.chunk_buckets, "prefill tokens") if chunk > 1 else 1
        n_patches = bucket(n_patches, self.patch_buckets, "patches")
        zeros = jnp.zeros((B,), jnp.int32)
        return (self.state, self.k, self.v, jnp.zeros((B, self.pool.max_pages), jnp.int32), zeros,
                {k: jnp.asarray(a) for k, a in self._empty_chunk(B, T, n_patches).items()}, zeros)

    def lower(self, batch: int, chunk: int, n_patches: int = 1, video: bool = True) -> jax.stages.Lowered:
        """The model call a tick runs at this shape bucket, lowered (not run, nothing donated):
        ``.compile().as_text()`` shows the pools aliased input to output, ``memory_analysis()``
        that no temporary grows with the pool. chunk 1 with ``video=False``: a decode step."""
        with contextlib.nullcontext() if self._tp is None else self._tp.binding():
            return self._advance.lower(*self.call_args(batch, chunk, n_patches), video=video)

    # ----------------------------------------------------------------- sessions
    def open(self, seed: int, context: str | None = None, sampling: SamplingParams | None = None) -> int:
        """A new session → its id. ``context`` (typed or system text) is laid out as the
        typed input of micro-turn 0, before whatever the user types then (joined by a
        newline); ``sampling`` overrides the engine's default."""
        if len(self._sessions) >= self.max_sessions:
            raise RuntimeError(f"the engine serves max_sessions={self.max_sessions} sessions: close one, or "
                               "build the engine with a larger max_sessions")
        sid = self._next_id
        self._next_id += 1
        self.pool.open(sid)
        self._sessions[sid] = Session(sid, int(seed), (sampling or self.sampling).validate(), context or "")
        return sid

    def _get(self, sid: int) -> Session:
        try:
            return self._sessions[sid]
        except KeyError:
            raise SessionError(f"unknown or closed session {sid!r}: open() a session first") from None

    def append(self, sid: int, inputs: TurnInputs) -> None:
        """Queue one micro-turn of input for the next :meth:`tick`. Everything is checked
        here (inputs, capacity, free pages); on error nothing is queued."""
        s = self._get(sid)
        if s.pending is not None:
            raise RuntimeError(f"session {sid} already has a micro-turn waiting: call tick() before appending again")
        bins, patches, tail = check_inputs(inputs, s.tails[-1])
        if patches is not None and len(patches) > self.patch_buckets[-1]:
            raise ValueError(f"the frame pair makes {len(patches)} patches, more than the largest patch bucket "
                             f"{self.patch_buckets[-1]}: send smaller frames or build with larger patch_buckets")
        typed = inputs.typed
        if s.micro_turn == 0 and s.context:
            typed = s.context + ("\n" + typed if typed else "")
        turn = MicroTurn(user_audio=bins, video=patches, typed=typed, background=inputs.background)
        seq = layout([turn], self.tokenizer, outputs=False, first_micro_turn=s.micro_turn, first_position=s.length)
        self.pool.ensure(sid, s.length + len(seq) + self.max_output_tokens)
        s.pending = Pending(turn, seq, tail)

    def load_history(self, sid: int, turns: list[MicroTurn]) -> None:
        """Prefill a new session (nothing committed, nothing pending) with finished
        micro-turns (inputs and outputs, laid out as :func:`tml.stream.layout` lays them;
        ``open``'s context is not added) as if it had lived them: a conversation resumed
        from its history, or re-prefilled (``python -m tml.sampler.bench`` times it). No
        :class:`TurnOutput` is made for them and the audio tail starts from zeros. In
        ``batch_invariant`` mode the KV bits equal those of living the turns (prefill
        chunking changes no bits); a :meth:`snapshot` restores exactly in either mode."""
        s = self._get(sid)
        if s.turns or s.pending is not None:
            raise RuntimeError(f"load_history needs a fresh session; session {sid} has committed or pending "
                               "micro-turns: open a new one")
        turns = list(turns)
        if not turns:
            return
        seq = layout(turns, self.tokenizer)
        self.pool.ensure(sid, len(seq))
        s.pending = Pending(turns[-1], seq, s.tails[-1])
        try:
            table = np.zeros((self.batch_buckets[0], self.pool.max_pages), np.int32)
            table[0] = self.pool.page_table(sid)
            self._prefill([s], self.batch_buckets[0], table, np.zeros(self.batch_buckets[0], np.int32))
        except BaseException:
            self.pool.truncate(sid, 0)
            raise
        finally:
            s.pending = None
        s.turns = turns
        s.starts = [int(i) for i in seq.micro_turn_starts()] + [len(seq)]
        s.tails = [np.zeros_like(s.tails[0]) for _ in s.starts]

    def rollback(self, sid: int, micro_turn: int) -> None:
        """Return to the state before ``micro_turn`` (0 ≤ micro_turn ≤ committed count):
        later micro-turns are forgotten and their pages returned; appending again
        reproduces them from the seed given the same inputs."""
        s = self._get(sid)
        if s.pending is not None:
            raise RuntimeError(f"session {sid} has a micro-turn waiting: call tick() before rolling back")
        n = len(s.turns)
        if not 0 <= micro_turn <= n:
            raise ValueError(f"rollback to micro-turn {micro_turn}: session {sid} has committed {n} "
                             f"(roll back to 0..{n})")
        del s.turns[micro_turn:], s.outputs[micro_turn:], s.starts[micro_turn + 1:], s.tails[micro_turn + 1:]
        self.pool.truncate(sid, s.length)

    def close(self, sid: int) -> None:
        """End a session (a pending micro-turn is dropped) and return its pages."""
        self._get(sid)
        self.pool.close(sid)
        del self._sessions[sid]

    def step(self, sid: int, inputs: TurnInputs) -> TurnOutput:
        """``append`` then ``tick`` (serving every pending session) → this session's output."""
        self.append(sid, inputs)
        return self.tick()[sid]

    def turns(self, sid: int) -> list[MicroTurn]:
        """The committed micro-turns (inputs and outputs): what :func:`tml.sampler.score` takes."""
        return list(self._get(sid).turns)

    def outputs(self, sid: int) -> list[TurnOutput]:
        return list(self._get(sid).outputs)

    def length(self, sid: int) -> int:
        """KV slots the session holds (the length of its row)."""
        return self._get(sid).length

    # --------------------------------------------------------------------- tick
    def tick(self) -> dict[int, TurnOutput]:
        """Serve every pending micro-turn → {session id: its output}."""
        pend = [s for s in self._sessions.values() if s.pending is not None]
        out: dict[int, TurnOutput] = {}
        for i in range(0, len(pend), self.batch_buckets[-1]):
            out.update(self._serve(pend[i:i + self.batch_buckets[-1]]))
        return out

    def _call(self, table, lengths, chunk, n_new, n, video=True):
        with contextlib.nullcontext() if self._tp is None else self._tp.binding():
            lt, ls, self.k, self.v = self._advance(self.state, self.k, self.v, jnp.asarray(table), jnp.asarray(lengths),
                                                   {k: jnp.asarray(a) for k, a in chunk.items()}, jnp.asarray(n_new),
                                                   video=video)
        return np.asarray(lt)[:n], np.asarray(ls)[:n]

    @staticmethod
    def _empty_chunk(B: int, T: int, n_patches: int) -> dict:
        return {"tokens": np.zeros((B, T), np.int32), "modality": np.zeros((B, T), np.int8),
                "positions": np.zeros((B, T), np.int32), "dmel": np.zeros((B, T, N_MELS), np.uint8),
                "patch_index": np.full((B, T), -1, np.int32),
                "patches": np.zeros((B, n_patches, *PATCH_SHAPE), np.uint8)}

    def _serve(self, group: list[Session]) -> dict[int, TurnOutput]:
        n = len(group)
        B = bucket(n, self.batch_buckets, "sessions")
        table = np.zeros((B, self.pool.max_pages), np.int32)
        lengths = np.zeros(B, np.int32)
        for i, s in enumerate(group):
            table[i], lengths[i] = self.pool.page_table(s.sid), s.length
        lp_text, lp_speech = self._prefill(group, B, table, lengths)
        outs = self._decode(group, B, table, lengths, lp_text, lp_speech)
        result = {}
        for i, (s, o) in enumerate(zip(group, outs)):
            s.turns.append(o.pop("turn"))
            s.starts.append(int(lengths[i]))
            s.tails.append(s.pending.tail)
            s.pending = None
            self.pool.truncate(s.sid, s.length)
            out = TurnOutput(micro_turn=len(s.turns) - 1, **o)
            s.outputs.append(out)
            result[s.sid] = out
        return result

    def _prefill(self, group, B, table, lengths):
        """All pending inputs, batched, in calls of at most ``max_prefill_chunk`` tokens
        per session → the log-probs after each session's last input token (its ``<out>``)."""
        n = len(group)
        seqs = [s.pending.inputs for s in group]
        done = np.zeros(n, int)
        total = np.array([len(q) for q in seqs])
        lp_text, lp_speech = [None] * n, [None] * n
        while (done < total).any():
            take = np.minimum(self.max_prefill_chunk, total - done)
            T = bucket(int(take.max()), self.chunk_buckets, "prefill tokens")
            parts = [seqs[i].slice(done[i], done[i] + take[i]) if take[i] else None for i in range(n)]
            n_patches = bucket(max([len(p.patches) for p in parts if p is not None] + [1]),
                               self.patch_buckets, "patches")
            chunk = self._empty_chunk(B, T, n_patches)
            for i, p in enumerate(parts):
                if p is None:
                    continue
                m = take[i]
                for key in ("tokens", "modality", "dmel", "patch_index"):
                    chunk[key][i, :m] = getattr(p, key)
                chunk["positions"][i, :m] = seqs[i].positions[done[i]:done[i] + m]
                chunk["patches"][i, :len(p.patches)] = p.patches
            n_new = np.zeros(B, np.int32)
            n_new[:n] = take
            lt, ls = self._call(table, lengths, chunk, n_new, n)
            for i in range(n):
                if take[i] and done[i] + take[i] == total[i]:
                    lp_text[i], lp_speech[i] = lt[i], ls[i]
            done += take
            lengths[:n] += take.astype(np.int32)
        return lp_text, lp_speech

    def _decode(self, group, B, table, lengths, lp_text, lp_speech):
        """Outputs token by token for all sessions until each has fed its ``<end>``."""
        n = len(group)
        gram = [OutputGrammar(self.tokenizer, self.max_output_tokens, self.max_text_bytes) for _ in group]
        rec = [{"tokens": [], "positions": [], "logprobs": [], "frames": [], "channels": [], "text": [],
                "control": []} for _ in group]
        active = list(range(n))
        ch_idx = np.arange(N_MELS)
        while active:
            chunk = self._empty_chunk(B, 1, 1)
            n_new = np.zeros(B, np.int32)
            for i in active:
                s, g, r = group[i], gram[i], rec[i]
                pos, mt = int(lengths[i]), s.micro_turn
                greedy = s.sampling.temperature == 0
                if g.phase == SPEECH:
                    u = None if greedy else uniforms(s.seed, mt, pos, STREAM_SPEECH, lp_speech[i].shape)
                    frame = choose(lp_speech[i], s.sampling, u).astype(np.uint8)
                    channels = lp_speech[i][ch_idx, frame]
                    token, lp, modality = g.speech, speech_frame_logprob(channels)[()], Modality.SPEECH_OUT
                    r["frames"].append(frame)
                    r["channels"].append(channels)
                    chunk["dmel"][i, 0] = frame
                else:
                    u = None if greedy else uniforms(s.seed, mt, pos, STREAM_TOKEN, lp_text[i].shape)
                    token = int(choose(lp_text[i], s.sampling, u, g.allowed()))
                    lp = lp_text[i][token]
                    modality = Modality.TEXT_OUT if token < 256 else Modality.CONTROL
                    if token < 256:
                        r["text"].append(token)
                    elif self.tokenizer.control_name(token) in CONTROL_ACTIONS:
                        r["control"].append(self.tokenizer.control_name(token))
                g.advance(token)
                r["tokens"].append(token)
                r["positions"].append(pos)
                r["logprobs"].append(np.float32(lp))
                chunk["tokens"][i, 0], chunk["modality"][i, 0], chunk["positions"][i, 0] = token, modality, pos
                n_new[i] = 1
            lt, ls = self._call(table, lengths, chunk, n_new, n, video=False)
            lengths[:B] += n_new
            for i in active:
                lp_text[i], lp_speech[i] = lt[i], ls[i]
            active = [i for i in active if gram[i].phase != DONE]
        outs = []
        for s, g, r in zip(group, gram, rec):
            text_bytes = bytes(r["text"])
            frames = np.asarray(r["frames"], np.uint8).reshape(-1, N_MELS)
            turn = MicroTurn(user_audio=s.pending.turn.user_audio, video=s.pending.turn.video,
                             typed=s.pending.turn.typed, background=s.pending.turn.background,
                             model_text=text_bytes.decode("utf-8"),
                             model_speech=frames if len(frames) else None, control=tuple(r["control"]))
            assert len(frames) in (0, FRAMES_PER_MICRO_TURN)
            wave = waveform_from_dmel(frames) if self.vocoder and len(frames) else (
                np.zeros(0, np.float32) if self.vocoder else None)
            outs.append(dict(turn=turn, text=turn.model_text, text_bytes=text_bytes, speech=frames, waveform=wave,
                             control=turn.control, tokens=np.asarray(r["tokens"], np.int32),
                             positions=np.asarray(r["positions"], np.int32),
                             logprobs=np.asarray(r["logprobs"], np.float32),
                             speech_channel_logprobs=np.asarray(r["channels"], np.float32).reshape(-1, N_MELS),
                             forced_end=g.forced_end))
        return outs
