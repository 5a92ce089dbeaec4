"""Privacy redaction of memory text (pure): what is replaced, what is kept, and how."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from actors.redaction import KINDS, RedactionPolicy, redact

ALL = RedactionPolicy()


def redacted(text: str, policy: RedactionPolicy = ALL) -> str:
    return redact(text, policy)[0]


@pytest.mark.parametrize(
    "email",
    [
        "bob@example.com",
        "Bob.Smith+newsletter@mail.example.co.uk",
        "o'neil_99@sub-domain.example.org",
        "x@a.io",
        "user%team=ops@example.museum",
        "jose@xn--80ak6aa92e.xn--p1ai",
        "ünïcode@exämple.de",
    ],
)
def test_email_addresses_are_redacted(email: str) -> None:
    text, counts = redact(f"write to {email}, thanks", ALL)
    assert text == "write to [email], thanks"
    assert counts["email"] == 1


@pytest.mark.parametrize("text", ["a @ b", "@handle", "name@localhost", "foo@bar", "2@3.4"])
def test_at_signs_that_are_not_addresses_are_kept(text: str) -> None:
    assert redacted(text) == text


@pytest.mark.parametrize(
    "card",
    [
        "4111111111111111",  # Visa, unbroken
        "4111 1111 1111 1111",
        "4111-1111-1111-1111",
        "5555 5555 5555 4444",  # Mastercard
        "3782 822463 10005",  # Amex 4-6-5
        "378282246310005",
        "3056 930902 5904",  # Diners 4-6-4
        "6011 0009 9013 9424",  # Discover
        "4222222222222",  # 13 digits
        "6304 0000 0000 0000 018",  # 19 digits, 4-4-4-4-3
    ],
)
def test_card_numbers_passing_luhn_are_redacted(card: str) -> None:
    text, counts = redact(f"paid with {card}.", ALL)
    assert text == "paid with [card]."
    assert counts == {"email": 0, "card": 1, "phone": 0}


@pytest.mark.parametrize(
    "number",
    [
        "4111111111111112",  # one digit off: fails Luhn
        "1234 5678 9012 3456",
        "1234-5678-9012-3456",
        "order 1234567812345678",
        "12345678901234567890123",  # too long to be a card
    ],
)
def test_numbers_failing_luhn_or_length_are_kept(number: str) -> None:
    assert redacted(f"ref {number} ok") == f"ref {number} ok"


def test_a_card_is_redacted_whole_not_half_as_a_phone() -> None:
    assert redacted("card 4111 1111 1111 1111 expires 2027") == "card [card] expires 2027"
    assert redacted("4111-1111-1111-1111") == "[card]"


def test_a_card_next_to_another_number_is_cut_at_its_groups() -> None:
    assert redacted("ref 12 4111 1111 1111 1111 2027") == "ref 12 [card] 2027"


@pytest.mark.parametrize(
    "phone",
    [
        "+1 (555) 123-4567",
        "+1 555 123 4567",
        "+1.555.123.4567",
        "+14155552671",
        "+44 20 7946 0958",
        "+44 (0)20 7946 0958",
        "+33 6 12 34 56 78",
        "+49-30-1234567",
        "(555) 123-4567",
        "(555)123-4567",
        "555-123-4567",
        "555.123.4567",
        "555 123 4567",
        "020 7946 0958",
        "06 12 34 56 78",
        "06.12.34.56.78",
        "030-1234567",
        "555-1234",
        "07946095812",
        "4155552671",
    ],
)
def test_phone_numbers_are_redacted(phone: str) -> None:
    text, counts = redact(f"call me on {phone} tomorrow", ALL)
    assert text == "call me on [phone] tomorrow"
    assert counts == {"email": 0, "card": 0, "phone": 1}


@pytest.mark.parametrize(
    "text",
    [
        "born in 1987",
        "see you in 2026",
        "I have 3 cats and 12 fish",
        "room 1234567 is an id, not a phone",
        "released v1.2.3, then 10.0.19041.1234 and 2.10.0",
        "the meeting is on 2026-11-25 at 12:30",
        "timestamp 2026-11-25T12:30:00Z",
        "due 25.11.2026 or 25-11-2026 or 11/25/2026",
        "it costs 1,299.00 or $1299.99",
        "from 2019-2024 and in 2024 2025 2026",
        "host 192.168.100.200 port 8080",
        "at 12:30:45 sharp",
        "pi is 3.14159265358979",
        "order 12345678901234567890",
    ],
)
def test_numbers_that_are_not_contact_data_are_kept(text: str) -> None:
    assert redact(text, ALL) == (text, dict.fromkeys(KINDS, 0))


def test_a_run_of_small_numbers_is_kept_whole() -> None:
    for text in ["12 34 56 78 90 12 34 56 78 90", "1 2 3 4 5 6 7 8 9 10 11 12 13 14"]:
        assert redacted(text) == text


def test_a_phone_next_to_another_number_is_kept_rather_than_guessed() -> None:
    # Which digits belong to the phone is ambiguous: the run is judged whole.
    assert redacted("555 123 4567 2") == "555 123 4567 2"
    assert redacted("555 123 4567, 2 times") == "[phone], 2 times"


def test_counts_every_kind_separately() -> None:
    text, counts = redact(
        "a@example.com, b@example.com; 4111 1111 1111 1111; +1 555 123 4567 or 555-987-6543",
        ALL,
    )
    assert text == "[email], [email]; [card]; [phone] or [phone]"
    assert counts == {"email": 2, "card": 1, "phone": 2}


def test_digits_inside_an_email_are_not_taken_for_a_phone() -> None:
    assert redact("mail 5551234567@example.com", ALL) == (
        "mail [email]",
        {"email": 1, "card": 0, "phone": 0},
    )


MIXED = "mail bob@example.com, card 4111 1111 1111 1111, phone +44 20 7946 0958"


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        (RedactionPolicy(emails=False), "mail bob@example.com, card [card], phone [phone]"),
        (RedactionPolicy(cards=False), "mail [email], card 4111 1111 1111 1111, phone [phone]"),
        (RedactionPolicy(phones=False), "mail [email], card [card], phone +44 20 7946 0958"),
        (RedactionPolicy(emails=False, cards=False, phones=False), MIXED),
    ],
)
def test_disabled_kinds_are_kept_and_not_counted(policy: RedactionPolicy, expected: str) -> None:
    text, counts = redact(MIXED, policy)
    assert text == expected
    assert counts["email"] == (1 if policy.emails else 0)
    assert counts["card"] == (1 if policy.cards else 0)
    assert counts["phone"] == (1 if policy.phones else 0)


def test_a_disabled_card_pass_does_not_let_phones_eat_a_card() -> None:
    # With cards off, a grouped 16-digit card is too long for a phone and stays whole.
    assert redacted("4111 1111 1111 1111", RedactionPolicy(cards=False)) == "4111 1111 1111 1111"


def test_replacement_template_names_the_kind() -> None:
    policy = RedactionPolicy(replacement="<redacted:{kind}>")
    assert redacted(MIXED, policy) == (
        "mail <redacted:email>, card <redacted:card>, phone <redacted:phone>"
    )


def test_replacement_without_placeholder_or_with_other_braces_is_copied() -> None:
    assert redacted("x@example.com", RedactionPolicy(replacement="***")) == "***"
    assert redacted("x@example.com", RedactionPolicy(replacement="{0} {kind}")) == "{0} email"


def test_policy_rejects_unknown_fields_and_is_frozen() -> None:
    with pytest.raises(msgspec.ValidationError, match="unknown field `email`"):
        msgspec.convert({"email": False}, RedactionPolicy)
    policy = msgspec.convert({"phones": False, "replacement": "#"}, RedactionPolicy)
    assert policy == RedactionPolicy(phones=False, replacement="#")
    with pytest.raises(AttributeError):
        policy.emails = False  # type: ignore[misc]


def test_redacting_twice_changes_nothing_more() -> None:
    once = redacted(MIXED + " and 555-123-4567 on 2026-11-25")
    assert redacted(once) == once


# -------------------------------------------------------------------------- properties

# Text built from the characters the matchers care about, so the search hits the edges.
edgy_text = st.text(alphabet="0123456789 -.()+@:,/abcxyz_", max_size=60)
plain_text = st.text(
    alphabet=st.characters(exclude_characters="@").filter(lambda c: not c.isdigit()),
    max_size=200,
)
policies = st.builds(
    RedactionPolicy,
    emails=st.booleans(),
    phones=st.booleans(),
    cards=st.booleans(),
    replacement=st.sampled_from(["[{kind}]", "<{kind}>", "REDACTED", ""]),
)


@given(plain_text, policies)
def test_text_without_digits_or_at_signs_is_unchanged(text: str, policy: RedactionPolicy) -> None:
    assert redact(text, policy) == (text, dict.fromkeys(KINDS, 0))


@given(st.one_of(edgy_text, st.text(max_size=100)), policies)
def test_redaction_is_idempotent(text: str, policy: RedactionPolicy) -> None:
    once, _ = redact(text, policy)
    assert redact(once, policy) == (once, dict.fromkeys(KINDS, 0))


def luhn_complete(body: list[int]) -> str:
    """``body`` with the check digit that makes it pass the Luhn check appended."""
    total = 0
    for i, d in enumerate(reversed(body)):
        total += (d * 2 - 9 if d > 4 else d * 2) if i % 2 == 0 else d
    return "".join(map(str, body)) + str(-total % 10)


cards = st.lists(st.integers(0, 9), min_size=15, max_size=15).map(luhn_complete)


@given(cards, st.sampled_from(["", " ", "-"]), st.sampled_from(["", "card ", "Paid: "]))
def test_any_luhn_valid_16_digit_number_is_redacted_as_a_card(
    card: str, separator: str, prefix: str
) -> None:
    grouped = separator.join(card[i : i + 4] for i in range(0, 16, 4))
    assert redact(f"{prefix}{grouped} thanks", ALL) == (
        f"{prefix}[card] thanks",
        {"email": 0, "card": 1, "phone": 0},
    )


@given(cards)
def test_a_16_digit_number_failing_luhn_is_kept(card: str) -> None:
    wrong = card[:-1] + str((int(card[-1]) + 1) % 10)
    grouped = " ".join(wrong[i : i + 4] for i in range(0, 16, 4))
    assert redacted(f"order {grouped}") == f"order {grouped}"


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "text",
    [
        "+1" + "1" * 5000 + "x",
        " ".join(["12"] * 20000),
        "-".join(["1234"] * 20000) + "x",
        "a" * 50000 + "@" + "b." * 20000,
        "(1)" * 20000,
        "1" * 200000,
        "a.b" * 20000 + "@",
    ],
)
def test_adversarial_inputs_do_not_backtrack_catastrophically(text: str) -> None:
    # A backtracking blow-up would take hours here; each pattern scans once.
    redact(text, ALL)


@given(edgy_text)
def test_counts_match_the_placeholders_left_behind(text: str) -> None:
    policy = RedactionPolicy(replacement="\x00{kind}\x00")
    out, counts = redact(text, policy)
    for kind in KINDS:
        assert out.count(f"\x00{kind}\x00") == counts[kind]
