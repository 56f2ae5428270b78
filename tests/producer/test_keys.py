"""Key layout: one untagged shard keeps today's names; shards carry `{ns:i}` and route by crc32."""

from __future__ import annotations

import pytest

from worker.keys import Keys


def test_one_untagged_shard_keeps_the_original_names() -> None:
    keys = Keys("hr")
    assert keys.requests == "hr:requests" and keys.dead_letter == "hr:dead"
    assert keys.request_streams == ("hr:requests:high", "hr:requests", "hr:requests:low")
    assert keys.result("x") == "hr:result:x" and keys.submitted("x") == "hr:submitted:x"
    assert keys.cancelled("x") == "hr:cancelled:x" and keys.reply("c") == "hr:reply:c"
    assert keys.replies("c") == ("hr:reply:c",) and keys.layout_value == "1"
    assert keys.shard_of("anything") == 0 and keys.shard_of_key("hr:requests") == 0


# Fixed vectors (docs/protocol.md, Shards): crc32 (IEEE 802.3, zlib's) of the UTF-8 id, mod shards.
@pytest.mark.parametrize(
    ("job_id", "shards", "shard"),
    [
        ("a", 8, 3),  # crc32 = 0xe8b7be43
        ("a", 3, 0),
        ("job-1", 8, 7),  # crc32 = 0x4c423a3f
        ("job-1", 3, 2),
        ("héllo", 8, 6),  # crc32 = 0x9e3b8236 (of the UTF-8 bytes)
        ("01J0000000000000000000000", 3, 1),  # crc32 = 0xdf9f3cba
    ],
)
def test_jobs_route_by_crc32_of_their_utf8_id(job_id: str, shards: int, shard: int) -> None:
    assert Keys("headrace", shards=shards).shard_of(job_id) == shard


def test_every_key_of_a_job_carries_its_shard_tag() -> None:
    keys = Keys("headrace", shards=8)
    assert keys.tagged and keys.layout_value == "8t"
    assert keys.result("job-1") == "{headrace:7}:result:job-1"
    assert keys.submitted("job-1") == "{headrace:7}:submitted:job-1"
    assert keys.cancelled("job-1") == "{headrace:7}:cancelled:job-1"
    assert keys.job_stream("job-1", 0) == "{headrace:7}:requests"
    assert keys.job_stream("job-1", 5) == "{headrace:7}:requests:high"
    assert keys.job_stream("job-1", -2) == "{headrace:7}:requests:low"
    assert keys.dead_letter_of(7) == "{headrace:7}:dead"
    assert keys.reply("c", 7) == "{headrace:7}:reply:c" and len(keys.replies("c")) == 8
    assert len(keys.request_streams) == 24 and keys.shard_streams(2)[1] == "{headrace:2}:requests"
    # Namespace-wide keys are not in a shard.
    assert keys.workers == "headrace:workers" and keys.cancel_channel == "headrace:cancel"
    assert keys.layout == "headrace:shards"


def test_a_cluster_tags_even_one_shard() -> None:
    keys = Keys("headrace", tagged=True)
    assert keys.requests == "{headrace:0}:requests" and keys.layout_value == "1t"
    assert keys.result("x") == "{headrace:0}:result:x"


def test_shard_of_key_reads_only_this_namespaces_tags() -> None:
    keys = Keys("ns", shards=4)
    assert keys.shard_of_key("{ns:3}:requests") == 3
    for name in (
        "{ns:4}:requests",
        "{ns:03}:reply:c",
        "{other:1}:reply:c",
        "ns:requests",
        "{ns:x}",
    ):
        assert keys.shard_of_key(name) is None, name


def test_reply_to_must_be_a_reply_stream_of_the_jobs_own_shard_when_tagged() -> None:
    keys = Keys("ns", shards=8)
    assert keys.may_reply_to("{ns:7}:reply:c", "job-1")
    assert not keys.may_reply_to("{ns:6}:reply:c", "job-1")  # another slot
    assert not keys.may_reply_to("{ns:7}:requests", "job-1")  # our own queue
    assert not keys.may_reply_to("elsewhere", "job-1")  # a key of any slot
    untagged = Keys("ns")
    assert untagged.may_reply_to("elsewhere") and untagged.may_reply_to("ns:reply:c")
    assert not untagged.may_reply_to("ns:requests")


def test_bad_namespaces_and_shard_counts_are_refused() -> None:
    for namespace in ("", "a:b", "a b", "{a}"):
        with pytest.raises(ValueError):
            Keys(namespace)
    with pytest.raises(ValueError):
        Keys("ns", shards=0)


def test_a_worker_may_read_a_subset_of_the_shards() -> None:
    keys = Keys("ns", shards=4, reading=(2, 0))
    assert keys.read_shards == (0, 2)
    assert keys.request_streams == (*keys.shard_streams(0), *keys.shard_streams(2))
    assert {shard for _, _, shard in keys.stream_levels} == {0, 2}
    assert len(keys.dead_letters) == 4 and keys.shard_of("job-1") == 3  # routing unchanged
    with pytest.raises(ValueError):
        Keys("ns", shards=4, reading=(4,))
