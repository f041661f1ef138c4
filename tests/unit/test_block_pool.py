"""The block pool, torch-free: exact block ids handed out, shared, cached and freed."""

import subprocess
import sys

from keel.engine.block_pool import BlockPool, hash_block


def test_scheduler_and_pool_do_not_import_torch():
    code = ("import sys; import keel.engine.scheduler, keel.engine.block_pool, keel.sampling_params; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_allocate_in_order_and_refuse_when_short():
    pool = BlockPool(4)
    assert pool.allocate(3) == [0, 1, 2]
    assert pool.allocate(2) is None  # nothing taken on failure
    assert pool.num_free == 1
    assert pool.allocate(1) == [3]
    assert pool.num_free == 0 and pool.usage == 1.0


def test_free_returns_tail_first_and_reuses_least_recently_freed():
    pool = BlockPool(4)
    a = pool.allocate(2)
    b = pool.allocate(2)
    pool.free(a)  # freed in reverse: 1 then 0
    pool.free(b)  # 3 then 2
    assert list(pool.free_queue) == [1, 0, 3, 2]
    assert pool.allocate(3) == [1, 0, 3]


def test_prefix_cache_hit_shares_block_and_counts_references():
    pool = BlockPool(4)
    h0 = hash_block(None, [1, 2, 3, 4])
    h1 = hash_block(h0, [5, 6, 7, 8])
    blocks = pool.allocate(2)
    pool.cache_block(blocks[0], h0)
    pool.cache_block(blocks[1], h1)
    assert pool.lookup_prefix([h0, h1, hash_block(h1, [9, 9, 9, 9])]) == [0, 1]
    pool.touch([0, 1])
    assert pool.ref_cnt[:2] == [2, 2]
    pool.free(blocks)
    assert pool.ref_cnt[:2] == [1, 1] and pool.num_free == 2
    pool.free([0, 1])
    # free but still cached: a later request can take them back from the middle of the free queue
    assert pool.num_free == 4 and pool.lookup_prefix([h0]) == [0]
    pool.touch([0])
    assert 0 not in pool.free_queue and pool.ref_cnt[0] == 1


def test_reallocating_a_cached_block_evicts_its_hash():
    pool = BlockPool(2)
    h = hash_block(None, [1, 2])
    [b] = pool.allocate(1)
    pool.cache_block(b, h)
    pool.free([b])
    assert pool.allocate(2) == [1, 0]
    assert pool.lookup_prefix([h]) == [] and pool.block_hash[0] is None


def test_hash_depends_on_prefix_tokens_and_adapter():
    h = hash_block(None, [1, 2, 3])
    assert h == hash_block(None, [1, 2, 3])
    assert h != hash_block(None, [1, 2, 4])
    assert h != hash_block(None, [1, 2, 3], adapter_id=7)
    assert hash_block(h, [4]) != hash_block(hash_block(None, [9, 9, 9]), [4])


def test_caching_disabled_never_hits():
    pool = BlockPool(2, enable_caching=False)
    h = hash_block(None, [1])
    pool.cache_block(0, h)
    assert pool.lookup_prefix([h]) == []
