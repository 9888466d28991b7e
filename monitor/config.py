"""Risk configuration (SPEC §3): load a TOML file into validated, immutable objects.

Every rule violation raises :class:`ConfigError` with one message that names the offending key
(as a TOML path) and the rule it breaks, so an operator can fix the file without reading code.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import math
import tomllib
from collections.abc import Container, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# Bound on |price|, |qty|, |fee| and |amount| of input records, and on a fixed price and a
# contract size here. The largest product the margin mathematics forms is
# qty·contract_size·price·settle_price (≤ 1e60), and balances are long sums of such terms, so
# state and events stay hundreds of orders of magnitude below float64's overflow (1.8e308)
# however long the stream: two deposits of 1e308 no longer make a balance infinite. 1e15 is
# above any real figure: a billion contracts at a million each.
MAX_MAGNITUDE = 1e15
# The floor of a price, quantity or contract size, for the other end of float64: the
# margins multiply four of them (q·cs·mark·spx) and divide by such products, and figures of
# 1e-300 made them 0 (a division by zero that stopped the instance on a valid tick, again
# at every restart). Four factors of 1e-15 are 1e-60, far above float64's smallest normal
# (2.2e-308). 1e-15 is below any real figure: a satoshi is 1e-8, the cheapest tokens 1e-10.
MIN_MAGNITUDE = 1e-15
# Identifiers (account, fill_id, entry_id, symbol, asset) become event ids, Kafka keys,
# checkpoint keys and log fields: an empty account makes the event id ":1:liquidation", a
# 10,000-character one 20 KB log lines. 256 characters is far above any real id (a UUID has
# 36). A name here longer than that could never be named by a record.
MAX_ID_LENGTH = 256


class ConfigError(ValueError):
    """The risk configuration is unreadable or breaks a rule of SPEC §3."""


def default_liquidation_target(liquidation: float, hysteresis: float) -> float:
    """SPEC §3: liquidation − 2·hysteresis, or 0.95·liquidation without hysteresis."""
    return liquidation - 2 * hysteresis if hysteresis > 0 else 0.95 * liquidation


@dataclass(frozen=True, slots=True)
class Thresholds:
    margin_call: float
    liquidation: float
    hysteresis: float
    # The ratio a liquidation plan restores (SPEC §5.1); NaN stands for "the default" and is
    # resolved on construction, so every reader sees a number.
    liquidation_target: float = math.nan

    def __post_init__(self) -> None:
        if math.isnan(self.liquidation_target):
            object.__setattr__(self, "liquidation_target",
                               default_liquidation_target(self.liquidation, self.hysteresis))


@dataclass(frozen=True, slots=True)
class Asset:
    name: str
    collateral_weight: float
    fixed_price: float | None
    price_symbol: str | None  # None exactly when the price is fixed


@dataclass(frozen=True, slots=True)
class Tier:
    max_notional: float  # math.inf for an open-ended last tier
    mmr: float
    imr: float
    maintenance_amount: float  # Binance's "cum": keeps MM continuous across tier boundaries


@dataclass(frozen=True, slots=True)
class Instrument:
    name: str
    settle: str
    contract_size: float
    mark_symbol: str
    tiers: tuple[Tier, ...]
    liquidation_fee: float = 0.0  # rate on the notional a liquidation closes (SPEC §5.1)

    def tier_for(self, notional: float) -> Tier:
        """The first tier whose max_notional is ≥ notional; beyond all of them, the last."""
        for tier in self.tiers:
            if notional <= tier.max_notional:
                return tier
        return self.tiers[-1]


@dataclass(frozen=True, slots=True)
class PriceRules:
    max_age_ms: int | None = None  # older prices are stale in events (SPEC §5.2); None: no check


@dataclass(frozen=True, slots=True)
class RiskConfig:
    thresholds: Thresholds
    assets: Mapping[str, Asset]
    instruments: Mapping[str, Instrument]
    prices: PriceRules = PriceRules()

    def price_symbols(self) -> frozenset[str]:
        """Every symbol whose ticks can move some valuation."""
        symbols = {a.price_symbol for a in self.assets.values() if a.price_symbol is not None}
        symbols.update(i.mark_symbol for i in self.instruments.values())
        return frozenset(symbols)


_TOP_LEVEL_KEYS = {"thresholds", "assets", "instruments", "prices"}


def fingerprint(config: RiskConfig) -> str:
    """A stable hash of the parsed config: equal for configs that evaluate alike, however the
    TOML was written (order, comments, defaults spelt out), and different for any change."""
    canonical = json.dumps(_without_optional_defaults(_plain(asdict(config)), config),
                           sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _without_optional_defaults(plain: dict[str, Any], config: RiskConfig) -> dict[str, Any]:
    """Drop the optional keys of SPEC §3 (liquidation plan, stale prices) where they hold their
    defaults: a config that does not use them keeps the fingerprint its checkpoints were
    written under before these keys existed, so upgrading liqmon needs no config roll-out."""
    th = config.thresholds
    if th.liquidation_target == default_liquidation_target(th.liquidation, th.hysteresis):
        del plain["thresholds"]["liquidation_target"]
    for name, instrument in config.instruments.items():
        if instrument.liquidation_fee == 0.0:
            del plain["instruments"][name]["liquidation_fee"]
    if config.prices == PriceRules():
        del plain["prices"]
    return plain


def _plain(value: Any) -> Any:
    """JSON-ready: mappings as dicts, tuples as lists, non-finite floats spelt out."""
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    return value


def load_config(path: str | Path) -> RiskConfig:
    """Read and validate a risk config file."""
    try:
        with open(path, "rb") as fh:
            # an editor on Windows may begin the file with a byte-order mark, which TOML
            # does not allow; it says nothing of the contents, as in the input files
            raw = tomllib.loads(fh.read().removeprefix(codecs.BOM_UTF8).decode("utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read risk config {path}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"risk config {path} is not valid TOML: {exc}") from exc
    except UnicodeDecodeError as exc:  # TOML is UTF-8 text
        raise ConfigError(f"risk config {path} is not valid TOML: not UTF-8 text (byte "
                          f"{exc.object[exc.start]:#04x} at offset {exc.start})") from exc
    return parse_config(raw)


def parse_config(raw: Mapping[str, Any]) -> RiskConfig:
    """Validate an already-parsed TOML document."""
    _no_unknown_keys(raw, _TOP_LEVEL_KEYS, "")
    thresholds = _thresholds(_table(raw, "thresholds", "thresholds"))
    assets_raw = _table(raw, "assets", "assets")
    if not assets_raw:
        raise ConfigError("assets: at least one asset must be configured")
    assets = {name: _asset(name, _table(assets_raw, name, f"assets.{_q(name)}"))
              for name in assets_raw}
    instruments_raw = _table(raw, "instruments", "instruments", required=False)
    instruments = {
        name: _instrument(name, _table(instruments_raw, name, f"instruments.{_q(name)}"), assets)
        for name in instruments_raw
    }
    for name in instruments:
        other = instrument_after_slash(name, instruments, first=0)
        if other is not None:
            raise ConfigError(
                f"instruments.{_q(name)}: must not end in '/' and the name of instrument "
                f"{other!r}: the event ids of an account's isolated {name} position "
                f"(account/symbol:counter:type, SPEC §4.1) could then be another account's "
                f"isolated {other} position's")
    prices = _price_rules(_table(raw, "prices", "prices", required=False))
    return RiskConfig(thresholds=thresholds, assets=assets, instruments=instruments,
                      prices=prices)


def instrument_after_slash(name: str, instruments: Container[str], first: int = 1
                           ) -> str | None:
    """The instrument named after a '/' in ``name`` (at index ``first`` or later) that ends
    it, if any. An isolated position's event ids are `account/symbol:counter:type` (SPEC
    §4.1), so an account id ending in '/' and an instrument (``first`` 1: a '/' at 0 has no
    account before it) would have the ids of another account's isolated position, and so
    would an instrument ending in '/' and another instrument (``first`` 0). Both are refused;
    then an id tells its risk unit apart from every other."""
    slash = name.find("/", first)
    while slash >= 0:
        if name[slash + 1:] in instruments:
            return name[slash + 1:]
        slash = name.find("/", slash + 1)
    return None


def _q(name: str) -> str:
    """Quote a TOML key the way a user would write it in a dotted path."""
    bare = name.replace("_", "").replace("-", "").isalnum()
    return name if bare else f'"{name}"'


def _nameable(name: str, where: str) -> None:
    """A name input records give (an asset, an instrument, a price symbol): one they can."""
    if not name:
        raise ConfigError(f"{where}: the name is empty (no record can give it)")
    if len(name) > MAX_ID_LENGTH:
        raise ConfigError(f"{where}: a name records can give is at most {MAX_ID_LENGTH} "
                          f"characters, got {len(name)}")


def _table(raw: Mapping[str, Any], key: str, where: str, required: bool = True) -> dict[str, Any]:
    if key not in raw:
        if required:
            raise ConfigError(f"{where}: missing (a table is required)")
        return {}
    value = raw[key]
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: must be a table, got {type(value).__name__}")
    return value


def _no_unknown_keys(raw: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(raw) - allowed)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"{prefix}{_q(unknown[0])}: unknown key (allowed: {', '.join(sorted(allowed))})"
        )


def _number(raw: Mapping[str, Any], key: str, where: str, default: float | None = None) -> float:
    if key not in raw:
        if default is None:
            raise ConfigError(f"{where}: missing (a number is required)")
        return default
    value = raw[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{where}: must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ConfigError(f"{where}: must be finite, got {value!r}")
    return value


def _thresholds(raw: dict[str, Any]) -> Thresholds:
    _no_unknown_keys(raw, {"margin_call", "liquidation", "hysteresis", "liquidation_target"},
                     "thresholds")
    mc = _number(raw, "margin_call", "thresholds.margin_call")
    liq = _number(raw, "liquidation", "thresholds.liquidation")
    h = _number(raw, "hysteresis", "thresholds.hysteresis", default=0.0)
    if h < 0:
        raise ConfigError(f"thresholds.hysteresis: must be ≥ 0, got {h}")
    if not mc > 0:  # else the next check would blame a hysteresis nobody wrote
        raise ConfigError(f"thresholds.margin_call: must be > 0 (SPEC §3: 0 ≤ hysteresis < "
                          f"margin_call), got {mc}")
    if not h < mc:
        raise ConfigError(f"thresholds.hysteresis: must be < margin_call ({mc}), got {h}")
    if not mc < liq:
        raise ConfigError(f"thresholds.liquidation: must be > margin_call ({mc}), got {liq}")
    # A plan must take the account out of LIQUIDATING, so it aims below where it may leave.
    exit_level = liq - h
    if "liquidation_target" in raw:
        target = _number(raw, "liquidation_target", "thresholds.liquidation_target")
        if not 0 < target < exit_level:
            raise ConfigError(
                f"thresholds.liquidation_target: must be > 0 and < liquidation − hysteresis "
                f"({exit_level}), got {target}"
            )
    else:
        target = default_liquidation_target(liq, h)
        if not target > 0:
            raise ConfigError(
                f"thresholds.liquidation_target: missing, and its default liquidation − "
                f"2·hysteresis ({target}) is not > 0: give a target in (0, {exit_level})"
            )
    return Thresholds(margin_call=mc, liquidation=liq, hysteresis=h, liquidation_target=target)


def _asset(name: str, raw: dict[str, Any]) -> Asset:
    where = f"assets.{_q(name)}"
    _nameable(name, where)
    _no_unknown_keys(raw, {"collateral_weight", "price", "price_symbol"}, where)
    weight = _number(raw, "collateral_weight", f"{where}.collateral_weight")
    if not 0.0 <= weight <= 1.0:
        raise ConfigError(f"{where}.collateral_weight: must be in [0, 1], got {weight}")
    if "price" in raw:
        if "price_symbol" in raw:
            raise ConfigError(
                f"{where}.price_symbol: give either a fixed price or a price_symbol, not both"
            )
        price = _number(raw, "price", f"{where}.price")
        if not MIN_MAGNITUDE <= price <= MAX_MAGNITUDE:  # else the margins over/underflow
            raise ConfigError(f"{where}.price: must be ≥ {MIN_MAGNITUDE:g} and ≤ "
                              f"{MAX_MAGNITUDE:g}, got {price}")
        return Asset(name=name, collateral_weight=weight, fixed_price=price, price_symbol=None)
    symbol = raw.get("price_symbol", name)
    if not isinstance(symbol, str) or not symbol:
        raise ConfigError(f"{where}.price_symbol: must be a non-empty string, got {symbol!r}")
    _nameable(symbol, f"{where}.price_symbol")
    return Asset(name=name, collateral_weight=weight, fixed_price=None, price_symbol=symbol)


def _instrument(name: str, raw: dict[str, Any], assets: Mapping[str, Asset]) -> Instrument:
    where = f"instruments.{_q(name)}"
    _nameable(name, where)
    _no_unknown_keys(raw, {"settle", "contract_size", "mark_symbol", "tiers", "liquidation_fee"},
                     where)
    settle = raw.get("settle")
    if settle is None:
        raise ConfigError(f"{where}.settle: missing (the asset in which PnL and fees settle)")
    if not isinstance(settle, str):
        raise ConfigError(f"{where}.settle: must be the name of an asset, got {settle!r}")
    if settle not in assets:
        raise ConfigError(f"{where}.settle: asset {settle!r} is not configured under [assets]")
    contract_size = _number(raw, "contract_size", f"{where}.contract_size", default=1.0)
    if not MIN_MAGNITUDE <= contract_size <= MAX_MAGNITUDE:
        raise ConfigError(f"{where}.contract_size: must be ≥ {MIN_MAGNITUDE:g} and ≤ "
                          f"{MAX_MAGNITUDE:g}, got {contract_size}")
    mark_symbol = raw.get("mark_symbol", name)
    if not isinstance(mark_symbol, str) or not mark_symbol:
        raise ConfigError(f"{where}.mark_symbol: must be a non-empty string, got {mark_symbol!r}")
    _nameable(mark_symbol, f"{where}.mark_symbol")
    fee = _number(raw, "liquidation_fee", f"{where}.liquidation_fee", default=0.0)
    if not 0 <= fee < 1:
        raise ConfigError(f"{where}.liquidation_fee: must be in [0, 1), got {fee}")
    return Instrument(
        name=name,
        settle=settle,
        contract_size=contract_size,
        mark_symbol=mark_symbol,
        tiers=_tiers(raw.get("tiers"), f"{where}.tiers"),
        liquidation_fee=fee,
    )


def _price_rules(raw: dict[str, Any]) -> PriceRules:
    _no_unknown_keys(raw, {"max_age_ms"}, "prices")
    if "max_age_ms" not in raw:
        return PriceRules()
    max_age = raw["max_age_ms"]
    if isinstance(max_age, bool) or not isinstance(max_age, int):
        raise ConfigError(f"prices.max_age_ms: must be an integer (milliseconds), got {max_age!r}")
    if max_age <= 0:
        raise ConfigError(f"prices.max_age_ms: must be > 0, got {max_age}")
    return PriceRules(max_age_ms=max_age)


def _tiers(raw: Any, where: str) -> tuple[Tier, ...]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{where}: must be a non-empty array of tier tables")
    tiers: list[Tier] = []
    for index, tier_raw in enumerate(raw):
        at = f"{where}[{index}]"
        if not isinstance(tier_raw, dict):
            raise ConfigError(f"{at}: must be a table {{max_notional, mmr, imr}}")
        _no_unknown_keys(tier_raw, {"max_notional", "mmr", "imr"}, at)
        max_notional = _max_notional(tier_raw, at, is_last=index == len(raw) - 1)
        mmr = _number(tier_raw, "mmr", f"{at}.mmr")
        imr = _number(tier_raw, "imr", f"{at}.imr")
        if not 0 < mmr <= imr <= 1:
            raise ConfigError(f"{at}: must satisfy 0 < mmr ≤ imr ≤ 1, got mmr={mmr}, imr={imr}")
        if tiers:
            previous = tiers[-1]
            if not max_notional > previous.max_notional:
                raise ConfigError(
                    f"{at}.max_notional: must be > the previous tier's "
                    f"({previous.max_notional}), got {max_notional}"
                )
            if mmr < previous.mmr:
                raise ConfigError(
                    f"{at}.mmr: must be ≥ the previous tier's ({previous.mmr}), got {mmr}"
                )
            cum = previous.maintenance_amount + previous.max_notional * (mmr - previous.mmr)
        else:
            cum = 0.0
        tiers.append(Tier(max_notional=max_notional, mmr=mmr, imr=imr, maintenance_amount=cum))
    return tuple(tiers)


def _max_notional(raw: dict[str, Any], where: str, is_last: bool) -> float:
    value = raw.get("max_notional")
    if value == "inf":
        if not is_last:
            raise ConfigError(f'{where}.max_notional: only the last tier may be "inf"')
        return math.inf
    max_notional = _number(raw, "max_notional", f"{where}.max_notional")
    if max_notional <= 0:
        raise ConfigError(f"{where}.max_notional: must be > 0, got {max_notional}")
    return max_notional
