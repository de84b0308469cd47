"""Global batches from canonical readers: the same rows whatever the process count, and a
run saved by two processes resumes in one with the same data order."""

import numpy as np
import pytest

from tests.train.trainer_fixtures import build_corpus
from tml.data_pipelines.loader import ShardLoader
from tml.train.global_batch import GlobalBatches, merge_states

ROWS, READERS = 4, 2


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("corpus"))


def batches(corpus, pid=0, nproc=1, state=None, readers=READERS):
    def make_reader(index, count, rows, reader_state):
        return ShardLoader(corpus.out_dir, row_length=256, max_patches=8, batch_size=rows, align=64,
                           process_index=index, process_count=count, state=reader_state)

    return GlobalBatches(make_reader, global_rows=ROWS, readers=readers, process_index=pid,
                         process_count=nproc, state=state)


def take(gb, n):
    it = iter(gb)
    return [next(it) for _ in range(n)]


def same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_two_processes_hold_the_halves_of_the_one_process_batch(corpus):
    one = take(batches(corpus), 3)
    halves = [take(batches(corpus, pid, 2), 3) for pid in range(2)]
    for i in range(3):
        joined = {k: np.concatenate([halves[0][i][k], halves[1][i][k]]) for k in one[i]}
        assert same(joined, one[i])
        assert not same(halves[0][i], halves[1][i])       # each process reads its own shards


def test_a_state_saved_by_two_processes_resumes_in_one(corpus):
    straight = take(batches(corpus), 5)
    pair = [batches(corpus, pid, 2) for pid in range(2)]
    for gb in pair:
        take(gb, 2)
    merged = merge_states([gb.state() for gb in pair])
    assert sorted(merged["readers"]) == ["0", "1"] and merged["count"] == READERS
    resumed = take(batches(corpus, state=merged), 3)
    for a, b in zip(resumed, straight[2:]):
        assert same(a, b)


def test_a_state_from_another_reader_count_is_refused(corpus):
    gb = batches(corpus)
    take(gb, 1)
    with pytest.raises(ValueError, match="saved with loader.readers=2, this run has 4"):
        batches(corpus, state=gb.state(), readers=4)
    with pytest.raises(ValueError, match="must be a multiple of the 2 processes"):
        batches(corpus, 0, 2, readers=1)
