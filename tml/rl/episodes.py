"""Which episodes a step plays: scripted scenarios cut to the recipe's length.

Step ``s`` plays one **group** per scenario of ``rl.scenarios``: conversation
``make_conversation(scenario, rl.seed, RL_INDEX_OFFSET + k)`` (``k`` the scenario's
counter, part of the RL state and checkpointed) played ``G = rl.group_size`` times with
the same user inputs and different sampling seeds. The user side is fed micro-turn by
micro-turn from the generated conversation (its audio, video, typed and background
text, as ``tml eval`` feeds it: :func:`tml.eval.run.prepare`); it does not react to the
model (an interrupted user does not stop, an ignored question is not asked again).

**Minutes-long episodes** (``rl.episode_seconds > 0``): an episode is a
:class:`~tml.rl.user.LongScript` — conversations ``counter, counter + 1, ...`` of the
scenario played back to back (1 s of room noise between them) until the script lasts
``rl.episode_seconds`` — and each of the group's episodes is played by its own
:class:`~tml.rl.user.ReactiveUser` (``rl.user_reacts``): the user stops when the model
talks over them and asks an ignored question again, so the episodes of a group share
the script, not necessarily every input, and each is scored on the reference of what its
user actually said (:meth:`~tml.rl.user.ReactiveUser.reference`). ``rl.max_micro_turns``
does not cut those.

Indices start at :data:`RL_INDEX_OFFSET` = 3 * 10**9: disjoint from the training corpus
(< 10**9 + eval split) and from the evaluation scenarios (2 * 10**9 + k,
:data:`tml.eval.scenarios.HELD_OUT_INDEX_OFFSET`), so ``tml eval`` after RL still scores
conversations RL never played.

**Cut.** An episode is the conversation's first ``rl.max_micro_turns`` micro-turns; its
:class:`~tml.eval.scenarios.Reference` keeps the tasks whose window ends by then (the
scorers themselves are unchanged). A conversation with no task left, or whose
generation fails, is skipped (said in the step's ``skipped`` list) and the counter moves on.
"""

from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass

from tml.eval.scenarios import HELD_OUT_INDEX_OFFSET, Reference
from tml.rl.user import Reactions
from tml.sampler.session import TurnInputs

RL_INDEX_OFFSET = 3_000_000_000
MAX_SKIPS = 20  # conversations tried per group before the step fails (a recipe whose cut keeps no task)


@dataclass
class EpisodeInputs:
    """One episode to play: its name, sampling seed and micro-turn inputs (shared by the
    episodes of a group)."""

    name: str
    seed: int
    inputs: list[TurnInputs]


@dataclass
class Group:
    """One scenario's G episodes: the shared reference and the episodes (a long group:
    ``ref`` None, each :class:`~tml.rl.user.LongEpisode` is scored on its user's)."""

    scenario: str
    index: int
    ref: Reference | None
    episodes: list


def cut_reference(ref: Reference, n: int) -> Reference | None:
    """``ref`` limited to its first ``n`` micro-turns (tasks whose window ends after ``n``
    dropped), or None when no task is left; ``n <= 0`` or beyond the end: unchanged."""
    if n <= 0 or n >= ref.n_micro_turns:
        return ref
    tasks = tuple(t for t in ref.tasks if t.t1 <= n)
    return dataclasses.replace(ref, n_micro_turns=n, tasks=tasks) if tasks else None


def episode_seed(seed: int, sample_id: str, g: int) -> int:
    """The sampling seed of episode ``g`` of a group (crc32: no two episodes share random bits)."""
    return zlib.crc32(f"{seed}/{sample_id}/{g}".encode())


def make_group(scenario: str, seed: int, counter: int, group_size: int, max_micro_turns: int
               ) -> tuple[Group | None, str | None, int]:
    """Conversation ``counter`` of ``scenario`` → (group or None, why skipped, next counter)."""
    from tml.eval.run import prepare

    p = prepare(scenario, seed, RL_INDEX_OFFSET - HELD_OUT_INDEX_OFFSET + counter)
    if p.error:
        return None, p.error, counter + 1
    ref = cut_reference(p.ref, max_micro_turns)
    if ref is None:
        return None, f"{p.sample_id}: no task ends within {max_micro_turns} micro-turns", counter + 1
    inputs = _turn_inputs(p)[:ref.n_micro_turns]
    episodes = [EpisodeInputs(f"{p.sample_id}/g{g}", episode_seed(seed, p.sample_id, g), inputs)
                for g in range(group_size)]
    return Group(scenario, p.index, ref, episodes), None, counter + 1


def _turn_inputs(p) -> list[TurnInputs]:
    return [TurnInputs(audio=x.audio, video=x.video, typed=x.typed, background=x.background)
            for x in p.sample.inputs()]


GAP_MICRO_TURNS = 5   # room noise between two conversations of a long script (1 s)


def make_long_group(scenario: str, seed: int, counter: int, group_size: int, seconds: float,
                    reactions: Reactions | None, *, index_offset: int = RL_INDEX_OFFSET
                    ) -> tuple[Group | None, list[str], int]:
    """Conversations ``index_offset + counter, + 1, ...`` of ``scenario`` back to back until
    the script lasts ``seconds`` (module docstring) → (group, skipped conversations, next
    counter). ``reactions`` None: the user does not react (a replay of the script);
    ``index_offset`` :data:`~tml.eval.scenarios.HELD_OUT_INDEX_OFFSET`: the held-out
    conversations ``tml eval`` scores (``eval.episode_seconds``)."""
    from tml.eval.run import prepare
    from tml.rl.user import LongEpisode, LongScript, Reactions, segment_of

    segments, skipped, first = [], [], counter
    tag = "" if index_offset == RL_INDEX_OFFSET else "-heldout"
    target = round(seconds * 5)
    while True:
        for _ in range(MAX_SKIPS):
            p = prepare(scenario, seed, index_offset - HELD_OUT_INDEX_OFFSET + counter)
            counter += 1
            if p.error is None:
                break
            skipped.append(p.error)
        else:
            return None, skipped, counter
        segments.append(segment_of(p.ref, _turn_inputs(p)))
        script = LongScript(f"{scenario}-long{tag}-s{seed}-{first}", scenario, segments, GAP_MICRO_TURNS)
        if script.n_micro_turns >= target:
            break
    rules = reactions if reactions is not None else Reactions(stop_after=0, repeat_after_s=0.0)
    episodes = [LongEpisode(f"{script.name}/g{g}", episode_seed(seed, script.name, g), script, rules)
                for g in range(group_size)]
    return Group(scenario, first, None, episodes), skipped, counter


def step_groups(scenarios: list[str], seed: int, counters: dict[str, int], group_size: int,
                max_micro_turns: int, *, episode_seconds: float = 0.0, reactions: Reactions | None = None
                ) -> tuple[list[Group], list[str], dict[str, int]]:
    """One group per scenario → (groups, skipped conversations with reasons, new counters);
    ``episode_seconds > 0``: minutes-long groups (:func:`make_long_group`)."""
    from tml.data_pipelines.scenarios import SCENARIOS

    unknown = sorted(set(scenarios) - set(SCENARIOS))
    if unknown or not scenarios:
        raise ValueError(f"rl.scenarios={scenarios}: give one or more of {list(SCENARIOS)}")
    counters = dict(counters)
    groups, skipped = [], []
    for sc in scenarios:
        if episode_seconds > 0:
            g, why, counters[sc] = make_long_group(sc, seed, counters.get(sc, 0), group_size, episode_seconds,
                                                   reactions)
            skipped += why
            if g is None:
                raise ValueError(f"rl.scenarios: {MAX_SKIPS} {sc} conversations in a row could not be generated "
                                 f"({why[-1]})")
            groups.append(g)
            continue
        for _ in range(MAX_SKIPS):
            g, why, counters[sc] = make_group(sc, seed, counters.get(sc, 0), group_size, max_micro_turns)
            if g is not None:
                groups.append(g)
                break
            skipped.append(why)
        else:
            raise ValueError(f"rl.scenarios: {MAX_SKIPS} {sc} conversations in a row had no task ending within "
                             f"rl.max_micro_turns={max_micro_turns}: raise it (0 = whole conversations)")
    return groups, skipped, counters


__all__ = ["GAP_MICRO_TURNS", "RL_INDEX_OFFSET", "EpisodeInputs", "Group", "cut_reference", "episode_seed",
           "make_group", "make_long_group", "step_groups"]
