from __future__ import annotations

import time

import pytest

from oms_pipeline.order_no import (LEGACY_LENGTH, LENGTH, SEQ_SPACE, Feistel, InMemoryBlocks, OrderNumbers,
                                   is_valid, issued_at, luhn_digit)

KEY = b"test-key-0123456789abcdef"
NOW = 1_796_689_200.0  # 2026-12-08 00:20:00 UTC


def numbers(instance: int = 1, blocks: InMemoryBlocks | None = None, **kw) -> OrderNumbers:
    return OrderNumbers(KEY, instance, blocks or InMemoryBlocks(), **kw)


def test_a_million_numbers_never_collide_and_are_fast():
    gen = numbers(block=10_000)
    started = time.perf_counter()
    issued = {gen.next() for _ in range(1_000_000)}
    elapsed = time.perf_counter() - started
    assert len(issued) == 1_000_000
    assert elapsed < 20, f"1M order numbers took {elapsed:.1f}s"


def test_numbers_have_fixed_length_prefix_and_valid_check_digit():
    gen = numbers()
    for _ in range(10_000):
        no = gen.next()
        assert len(no) == LENGTH == 30 and no.startswith("1") and no.isdigit()
        assert is_valid(no) and OrderNumbers.is_valid(no)


def test_numbers_carry_the_utc_second_they_were_issued():
    gen = numbers()
    assert gen.next(NOW)[1:13] == "261208002000"
    assert gen.next(NOW + 59.9)[1:13] == "261208002059"
    assert gen.next(NOW + 86_400)[1:13] == "261209002000"


def test_the_second_of_issue_is_read_back_and_legacy_numbers_have_none():
    gen = numbers()
    assert issued_at(gen.next(NOW + 12.7)) == NOW + 12
    body = gen.next(NOW)[-17:-1]
    assert issued_at("1" + body + luhn_digit("1" + body)) is None


def test_numbers_of_later_seconds_sort_after_earlier_ones():
    # What keeps inserts into indexes keyed by order number at the index's right-hand end.
    gen = numbers()
    issued = [gen.next(NOW + i // 100) for i in range(1_000)]
    for earlier, later in zip(issued[:-100], issued[100:]):
        assert earlier < later and int(earlier) < int(later)


def test_numbers_issued_before_the_stamp_stay_valid():
    # Made by the 18-digit format: prefix + the same permuted body + check digit.
    gen = numbers(42, InMemoryBlocks(start=7_000))
    body = gen.next(NOW)[-17:-1]
    legacy = "1" + body + luhn_digit("1" + body)
    assert len(legacy) == LEGACY_LENGTH == 18 and is_valid(legacy)
    assert gen.counter_of(legacy) == (42, 7_000)
    assert not is_valid(legacy[:-1] + str((int(legacy[-1]) + 1) % 10))


def test_consecutive_numbers_within_a_second_are_not_ordered():
    gen = numbers()
    issued = [int(gen.next(NOW)) for _ in range(10_000)]
    increasing = sum(a < b for a, b in zip(issued, issued[1:])) / (len(issued) - 1)
    assert abs(increasing - 0.5) < 0.03


def test_differences_do_not_track_the_count_between_numbers():
    # Sequentially close numbers land all over the 16-digit range.
    gen = numbers()
    bodies = [int(gen.next()[-17:-1]) for _ in range(2_000)]
    assert min(bodies) < 10**15 and max(bodies) > 9 * 10**15


def test_check_digit_catches_every_single_digit_change():
    no = numbers().next()
    for i in range(len(no)):
        for d in "0123456789":
            if d != no[i]:
                assert not is_valid(no[:i] + d + no[i + 1:])


def test_malformed_numbers_are_invalid():
    no = numbers().next()
    for bad in ("", no[:-1], no + "0", no[:-2] + no[-1], "2" + no[1:], no[:5] + "x" + no[6:], "１" + no[1:]):
        assert not is_valid(bad)


def test_a_number_whose_time_of_issue_is_no_date_is_invalid():
    for stamp in ("261307225012", "260230120000", "261208246000"):  # month 13, 30 February, 24:60
        payload = "1" + stamp + "1234567890123456"
        assert not is_valid(payload + luhn_digit(payload))
    payload = "1" + "261208002012" + "1234567890123456"
    assert is_valid(payload + luhn_digit(payload)) and issued_at(payload + luhn_digit(payload)) == NOW + 12


def test_luhn_matches_the_known_example():
    assert luhn_digit("7992739871") == "3"


def test_two_instances_never_collide_even_with_the_same_sequence():
    # Each instance has its own sequence, both starting at 0.
    gen_a, gen_b = numbers(1, InMemoryBlocks()), numbers(2, InMemoryBlocks())
    a = {gen_a.next() for _ in range(50_000)}
    b = {gen_b.next() for _ in range(50_000)}
    assert not a & b


def test_restart_continues_from_the_next_block_without_reuse():
    store = InMemoryBlocks()
    first = numbers(3, store, block=100)
    before = [first.next() for _ in range(150)]
    restarted = numbers(3, store, block=100)  # same instance, same store, new process
    after = [restarted.next() for _ in range(500)]
    assert not set(before) & set(after)
    assert restarted.counter_of(after[0]) == (3, 200)  # the half-used block is skipped


def test_operator_can_recover_instance_and_sequence_with_the_key():
    gen = numbers(42, InMemoryBlocks(start=7_000))
    no = gen.next(NOW)
    assert gen.counter_of(no) == (42, 7_000)
    assert numbers(0).format(42 * SEQ_SPACE + 7_000, NOW) == no  # pure mapping, same key


def test_a_different_key_gives_different_numbers():
    other = OrderNumbers(b"another-key-0123456789", 1, InMemoryBlocks())
    assert other.next() != numbers(1).next()


def test_feistel_is_a_permutation_with_an_inverse():
    f = Feistel(KEY)
    for x in (0, 1, 10**16 - 1, 123_456_789_012_345):
        y = f.encrypt(x)
        assert 0 <= y < 10**16 and f.decrypt(y) == x


def test_block_source_outside_the_sequence_space_is_refused():
    gen = OrderNumbers(KEY, 1, lambda n: SEQ_SPACE)
    with pytest.raises(RuntimeError, match="outside its sequence space"):
        gen.next()


@pytest.mark.parametrize("kwargs", [dict(instance=-1), dict(instance=10_000), dict(key=b"short"),
                                    dict(prefix="0"), dict(block=0)])
def test_bad_configuration_is_refused(kwargs):
    args = dict(key=KEY, instance=1, reserve_block=InMemoryBlocks()) | kwargs
    with pytest.raises(ValueError):
        OrderNumbers(**args)
