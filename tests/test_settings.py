import pytest

import pwriter.plan.settings
from pwriter.errors import UsageError
from pwriter.plan.settings import ConfigError, load_settings, parse_size, settings_from, settings_with


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4MiB", 4 << 20),
        ("1M", 1 << 20),
        ("512KB", 512 << 10),
        ("512kb", 512 << 10),
        ("2 GiB", 2 << 30),
        ("65536", 65536),
        ("4096B", 4096),
        (8192, 8192),
    ],
)
def test_parse_size(text: object, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["4XB", "", "-1M", "1.5M", "M"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(text)


def test_defaults() -> None:
    settings = load_settings()
    assert settings.layout == "auto"
    assert settings.backend == "auto"
    assert settings.fsync is True
    assert settings.direct is False
    assert settings.stripe_size is None and settings.lanes is None


def test_environment_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PWRITER_STRIPE_SIZE", "8MiB")
    monkeypatch.setenv("PWRITER_LAYOUT", "sharded")
    monkeypatch.setenv("PWRITER_FSYNC", "false")
    monkeypatch.setenv("PWRITER_MEMORY_BUDGET", "64M")
    monkeypatch.setenv("PWRITER_WRITE_CALL_SIZE", "256KiB")
    settings = load_settings()
    assert (settings.stripe_size, settings.layout, settings.fsync, settings.memory_budget,
            settings.write_call_size) == (8 << 20, "sharded", False, 64 << 20, 256 << 10)


def test_explicit_values_beat_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PWRITER_LANES", "3")
    assert load_settings(lanes=5).lanes == 5
    assert load_settings(lanes=None).lanes == 3  # None means "not given"


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"stripe_size": "4XB"}, "stripe_size"),
        ({"stripe_size": "1K"}, "stripe_size"),
        ({"layout": "diagonal"}, "layout"),
        ({"backend": "magic"}, "backend"),
        ({"lanes": 0}, "lanes"),
        ({"lanes": "many"}, "lanes"),
        ({"buffers_per_lane": 1}, "buffers_per_lane"),
        ({"max_delay": -1}, "max_delay"),
        ({"memory_budget": "1K"}, "memory_budget"),
        ({"write_call_size": "1K"}, "write_call_size"),
    ],
)
def test_invalid_values_name_the_field(overrides: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(**overrides)
    message = str(caught.value)
    assert field in message
    assert "\n" not in message
    assert isinstance(caught.value, UsageError) and caught.value.exit_code == 2


def test_invalid_environment_names_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PWRITER_QUEUE_DEPTH", "deep")
    with pytest.raises(ConfigError, match="queue_depth"):
        load_settings()


def test_environment_error_names_the_variable_and_unknown_variables_are_ignored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PWRITER_NOT_A_SETTING", "whatever")
    monkeypatch.setenv("pwriter_level", "2")  # names are not case-sensitive
    assert load_settings().level == 2
    monkeypatch.setenv("PWRITER_STRIPE_SIZE", "huge")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert str(caught.value).startswith("invalid setting stripe_size='huge' (from PWRITER_STRIPE_SIZE): ")
    # An explicit value replaces the variable, and so does its blame.
    with pytest.raises(ConfigError) as caught:
        load_settings(stripe_size="4XB")
    assert "(from" not in str(caught.value)


@pytest.fixture
def fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    """As in a new process: no old name has warned yet."""
    monkeypatch.setattr(pwriter.plan.settings, "_warned", set())


@pytest.mark.usefixtures("fresh_warnings")
@pytest.mark.parametrize(("old", "new"), [("workers", "lanes"), ("buffers_per_worker", "buffers_per_lane")])
def test_old_keyword_works_and_warns_once(old: str, new: str) -> None:
    with pytest.warns(FutureWarning, match=f"{old}= is now {new}=") as record:
        assert getattr(load_settings(**{old: 3}), new) == 3
        assert getattr(settings_with(load_settings(), **{old: 4}), new) == 4
        assert getattr(settings_from(None, {old: 5}, "open_writer"), new) == 5
        assert getattr(settings_from(load_settings(), {old: 6, new: 6}, "merge"), new) == 6  # the same value: fine
    assert len(record) == 1


@pytest.mark.usefixtures("fresh_warnings")
def test_old_and_new_keyword_with_different_values_is_refused() -> None:
    with pytest.warns(FutureWarning), pytest.raises(ConfigError, match="lanes=2 and workers=3"):
        load_settings(lanes=2, workers=3)


@pytest.mark.usefixtures("fresh_warnings")
def test_old_variable_works_and_warns_once(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PWRITER_WORKERS", "3")
    monkeypatch.setenv("PWRITER_BUFFERS_PER_WORKER", "5")
    assert (load_settings().lanes, load_settings().buffers_per_lane) == (3, 5)
    assert load_settings(lanes=4).lanes == 4  # an explicit value still wins
    assert sorted(capsys.readouterr().err.splitlines()) == [
        "pwriter: warning: PWRITER_BUFFERS_PER_WORKER is now PWRITER_BUFFERS_PER_LANE",
        "pwriter: warning: PWRITER_WORKERS is now PWRITER_LANES",
    ]
    monkeypatch.setenv("PWRITER_LANES", "3")
    assert load_settings().lanes == 3  # the same value under both names
    monkeypatch.setenv("PWRITER_LANES", "2")
    with pytest.raises(ConfigError, match="PWRITER_LANES='2' and PWRITER_WORKERS='3'"):
        load_settings()
