from services.common.block_hash import (
    ROOT_PARENT_HASH,
    MultiModalSpan,
    block_extra_keys,
    hash_block_tokens,
    hash_request_blocks,
)


def test_hashes_chain_and_are_stable_across_processes():
    hashes = hash_request_blocks(list(range(10)), 4)
    assert len(hashes) == 2  # the partial third block is not hashed
    assert hashes[0] == hash_block_tokens(ROOT_PARENT_HASH, [0, 1, 2, 3])
    assert hashes[1] == hash_block_tokens(hashes[0], [4, 5, 6, 7])
    # a fixed value: the same in every process and on every host (never Python's salted hash())
    assert hashes[0] == hash_block_tokens(0, (0, 1, 2, 3))
    assert isinstance(hashes[0], int) and 0 <= hashes[0] < 2**64


def test_same_block_after_a_different_prefix_hashes_differently():
    a = hash_request_blocks([1, 2, 3, 4, 9, 9, 9, 9], 4)
    b = hash_request_blocks([5, 6, 7, 8, 9, 9, 9, 9], 4)
    assert a[1] != b[1]


def test_known_hashes_are_extended_not_recomputed():
    full = hash_request_blocks(list(range(12)), 4)
    assert hash_request_blocks(list(range(12)), 4, known_hashes=full[:1]) == full


def test_salt_and_images_enter_the_extra_keys():
    tokens = [7] * 8
    plain = hash_request_blocks(tokens, 4)
    salted = hash_request_blocks(tokens, 4, cache_salt="t1")
    assert plain[0] != salted[0] and plain[1] != salted[1]  # the salt reaches every block through the chain
    img_a = hash_request_blocks(tokens, 4, mm_spans=[MultiModalSpan("aaa", 5, 2)])
    img_b = hash_request_blocks(tokens, 4, mm_spans=[MultiModalSpan("bbb", 5, 2)])
    assert img_a[0] == plain[0]  # the image does not touch block 0
    assert img_a[1] != img_b[1]  # same placeholder tokens, different images: different KV
    assert block_extra_keys(1, 4, mm_spans=[MultiModalSpan("aaa", 5, 2)]) == ("mm:aaa:5",)
