"""Order numbers: unique, fixed length, and not guessable (DESIGN R-3, seed 004).

A counter `instance * SEQ_SPACE + seq` is unique by construction: instance ids
are unique among running daemons, and each instance's sequence comes from
store-reserved blocks, so a restart never hands out a number twice (the unused
rest of a block is skipped, like a database sequence cache).

Seed 004 warns that sequential numbers reveal sales volume. So the counter is
encrypted with a keyed permutation of [0, 10^16): a Feistel network over two
8-digit halves whose round function is keyed BLAKE2b. Being a permutation it
cannot collide; being keyed, two numbers say nothing about how many orders lie
between them.

The number is PREFIX + the UTC second it was issued (yyMMddHHmmss) + the 16
permuted digits + a Luhn check digit, 30 digits in all. The time is what a
customer already knows about their order, and it says nothing about volume.
It makes numbers increase from one second to the next, so every index keyed by
order number takes new rows at its right-hand end: the pages being written stay
in cache however large the tables grow, where fully permuted numbers land all
over the index and read an ever larger share of it from disk. Uniqueness does
not depend on the clock: the permuted counter alone never repeats. The check
digit rejects a mistyped digit before any lookup. Numbers issued before the
time was added are 18 digits (PREFIX + 16 + check) and stay valid.
"""
from __future__ import annotations

import calendar
import hashlib
import threading
import time
from typing import Callable

HALF = 10**8  # each Feistel half is 8 decimal digits
DOMAIN = HALF * HALF  # 16-digit body
MAX_INSTANCES = 10_000
SEQ_SPACE = DOMAIN // MAX_INSTANCES  # 10^12 numbers per instance
ROUNDS = 6  # 4 is the Luby-Rackoff minimum; 2 more are cheap margin
PREFIX = "1"  # non-zero, so the number survives being stored as an integer
STAMP = "%y%m%d%H%M%S"  # the UTC second of issue
STAMP_DIGITS = 12
LENGTH = len(PREFIX) + STAMP_DIGITS + 16 + 1
LEGACY_LENGTH = len(PREFIX) + 16 + 1  # numbers issued before the stamp was added
# An order number in a request, either length; split children add "-N".
PATTERN = rf"[0-9]{{{LEGACY_LENGTH}}}(?:[0-9]{{{STAMP_DIGITS}}})?"
CHILD_PATTERN = PATTERN + r"(?:-[0-9]{1,3})?"
SHAPE = f"{LENGTH} digits, or {LEGACY_LENGTH} for older orders"  # for error messages

# Luhn doubles every second digit from the right; this maps d -> digit sum of 2d.
_DOUBLED = bytes.maketrans(b"0123456789", b"0246813579")


def luhn_digit(payload: str) -> str:
    """The check digit that makes `payload + digit` pass the Luhn test."""
    rev = payload[::-1].encode()
    # Summing ASCII bytes and subtracting ord("0") per digit is a fast digit sum.
    total = sum(rev[0::2].translate(_DOUBLED)) + sum(rev[1::2]) - 48 * len(rev)
    return str(-total % 10)


def is_valid(no: str, prefix: str = PREFIX) -> bool:
    """Well-formed order number: length, prefix, ASCII digits, a real time of issue (30 digits)
    and check digit."""
    digits = len(no) - len(prefix)
    if not (digits in (STAMP_DIGITS + 17, 17) and no.startswith(prefix)
            and no.isascii() and no.isdigit() and luhn_digit(no[:-1]) == no[-1]):
        return False
    return digits == 17 or _stamp_time(no, len(prefix)) is not None


def issued_at(no: str) -> float | None:
    """The UTC second a valid number carries (epoch seconds); None for an 18-digit number
    issued before the time was added."""
    return _stamp_time(no, len(PREFIX)) if len(no) == LENGTH else None


def _stamp_time(no: str, at: int) -> float | None:
    try:
        return float(calendar.timegm(time.strptime(no[at:at + STAMP_DIGITS], STAMP)))
    except ValueError:  # not a date and time (month 13, 30 February, ...)
        return None


def _round_functions(key: bytes) -> list["hashlib._Hash"]:
    # BLAKE2b is a PRF when keyed; keys longer than its 64-byte limit are hashed.
    if len(key) < 16:
        raise ValueError("order number key must be at least 16 bytes")
    if len(key) > 64:
        key = hashlib.blake2b(key).digest()
    rounds = []
    for i in range(ROUNDS):
        h = hashlib.blake2b(digest_size=8, key=key, person=b"oms-order-no")
        h.update(bytes([i]))  # distinct function per round
        rounds.append(h)
    return rounds


class Feistel:
    """A keyed permutation of [0, DOMAIN) with its inverse."""

    def __init__(self, key: bytes) -> None:
        self._rounds = _round_functions(key)

    @staticmethod
    def _f(keyed: "hashlib._Hash", half: int) -> int:
        # Copying the pre-keyed state skips the key block's compression per call.
        h = keyed.copy()
        h.update(half.to_bytes(4, "big"))
        return int.from_bytes(h.digest(), "big")

    def encrypt(self, x: int) -> int:
        left, right = divmod(x, HALF)
        f = self._f
        for keyed in self._rounds:
            left, right = right, (left + f(keyed, right)) % HALF
        return left * HALF + right

    def decrypt(self, y: int) -> int:
        left, right = divmod(y, HALF)
        f = self._f
        for keyed in reversed(self._rounds):
            left, right = (right - f(keyed, left)) % HALF, left
        return left * HALF + right


class InMemoryBlocks:
    """A `reserve_block` for tests and the embedded mode: a counter in memory.

    Production passes a store-backed one (an UPDATE ... RETURNING on a
    per-instance row), so blocks survive restarts.
    """

    def __init__(self, start: int = 0) -> None:
        self._next = start
        self._lock = threading.Lock()

    def __call__(self, n: int) -> int:
        with self._lock:
            first, self._next = self._next, self._next + n
        return first


class OrderNumbers:
    """Hands out order numbers for one daemon instance.

    `reserve_block(n)` must return the first sequence value of n values never
    returned before for this instance id (across restarts).
    """

    def __init__(self, key: bytes, instance: int, reserve_block: Callable[[int], int],
                 block: int = 1000, prefix: str = PREFIX) -> None:
        if not 0 <= instance < MAX_INSTANCES:
            raise ValueError(f"instance id must be in [0, {MAX_INSTANCES}), got {instance}")
        if len(prefix) != 1 or prefix not in "123456789":
            raise ValueError(f"prefix must be one digit 1-9, got {prefix!r}")
        if block < 1:
            raise ValueError(f"block size must be positive, got {block}")
        self.instance, self.prefix, self.block = instance, prefix, block
        self._feistel = Feistel(key)
        self._reserve = reserve_block
        self._next = self._end = 0
        self._lock = threading.Lock()
        self._stamp_cache = (-1, "")  # (second, its stamp), replaced as one object

    def _refill(self) -> None:
        first = self._reserve(self.block)
        if not 0 <= first <= SEQ_SPACE - self.block:
            raise RuntimeError(f"instance {self.instance}: reserved block at {first} "
                               f"is outside its sequence space [0, {SEQ_SPACE})")
        self._next, self._end = first, first + self.block

    def _take(self) -> int:
        with self._lock:
            if self._next >= self._end:
                self._refill()
            seq, self._next = self._next, self._next + 1
        return seq

    def next(self, now: float | None = None) -> str:
        """A new order number, never handed out before; `now` (epoch seconds, default
        the system clock) is the time of issue it carries."""
        return self.format(self.instance * SEQ_SPACE + self._take(), time.time() if now is None else now)

    def format(self, counter: int, now: float) -> str:
        """The order number of a counter value issued at `now` (pure: consumes no sequence)."""
        payload = f"{self.prefix}{self._stamp(int(now))}{self._feistel.encrypt(counter):016d}"
        return payload + luhn_digit(payload)

    def _stamp(self, second: int) -> str:
        cached = self._stamp_cache
        if cached[0] != second:
            cached = self._stamp_cache = (second, time.strftime(STAMP, time.gmtime(second)))
        return cached[1]

    def counter_of(self, no: str) -> tuple[int, int]:
        """(instance, seq) behind a number; needs the key, so for operators only."""
        if not is_valid(no, self.prefix):
            raise ValueError(f"not a valid order number: {no!r}")
        return divmod(self._feistel.decrypt(int(no[-17:-1])), SEQ_SPACE)

    is_valid = staticmethod(is_valid)
