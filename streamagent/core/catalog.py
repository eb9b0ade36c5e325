"""The coupon catalog: the action space. Action 0 is 'no coupon'; coupons follow in file order."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import orjson
import yaml

from streamagent.errors import CatalogError

NO_COUPON = "none"
KINDS = ("percent_off", "amount_off", "free_shipping")
DEFAULT_CATALOG = Path(__file__).resolve().parents[1] / "data" / "coupons.yaml"


@dataclass(frozen=True, slots=True)
class Coupon:
    id: str
    kind: str
    value: float
    min_spend: float
    valid_days: float
    cost: float

    def discount_on(self, order_amount: float, shipping_cost: float = 0.0) -> float:
        """Discount this coupon gives on an order (0 if the order is below min_spend)."""
        if order_amount < self.min_spend:
            return 0.0
        if self.kind == "percent_off":
            return order_amount * self.value / 100.0
        if self.kind == "amount_off":
            return min(self.value, order_amount)
        return shipping_cost


@dataclass(frozen=True)
class Catalog:
    coupons: tuple[Coupon, ...]
    expected_basket: float = 60.0
    shipping_cost: float = 4.9

    @property
    def actions(self) -> tuple[str, ...]:
        return (NO_COUPON,) + tuple(c.id for c in self.coupons)

    @property
    def n_actions(self) -> int:
        return len(self.coupons) + 1

    def coupon(self, action_index: int) -> Coupon | None:
        return None if action_index == 0 else self.coupons[action_index - 1]

    def costs(self) -> list[float]:
        return [0.0] + [c.cost for c in self.coupons]


def _coupon(doc: dict, expected_basket: float, shipping: float, where: str) -> Coupon:
    try:
        cid, kind = str(doc["id"]), str(doc["kind"])
        value = float(doc.get("value", 0))
        min_spend = float(doc.get("min_spend", 0))
        valid_days = float(doc.get("valid_days", 7))
    except (KeyError, TypeError, ValueError) as exc:
        raise CatalogError(f"{where}: coupon {doc!r} is missing id/kind or has a bad number ({exc})")
    if kind not in KINDS:
        raise CatalogError(f"{where}: coupon {cid!r} has kind {kind!r}; expected one of {KINDS}")
    if cid == NO_COUPON:
        raise CatalogError(f"{where}: '{NO_COUPON}' is reserved for the no-coupon action")
    if value < 0 or min_spend < 0 or valid_days <= 0 or (kind == "percent_off" and value > 100):
        raise CatalogError(f"{where}: coupon {cid!r} has an out-of-range value/min_spend/valid_days")
    if "cost" in doc:
        cost = float(doc["cost"])
    elif kind == "amount_off":
        cost = value
    elif kind == "percent_off":
        cost = value / 100.0 * max(expected_basket, min_spend)
    else:
        cost = shipping
    return Coupon(cid, kind, value, min_spend, valid_days, cost)


def load_catalog(path: Path | str | None = None) -> Catalog:
    p = Path(path) if path else DEFAULT_CATALOG
    try:
        text = p.read_text()
    except OSError as exc:
        raise CatalogError(f"cannot read coupon catalog {p}: {exc}") from None
    try:
        doc = orjson.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (orjson.JSONDecodeError, yaml.YAMLError) as exc:
        raise CatalogError(f"{p}: not valid {'JSON' if p.suffix == '.json' else 'YAML'}: {exc}")
    if not isinstance(doc, dict) or not isinstance(doc.get("coupons"), list) or not doc["coupons"]:
        raise CatalogError(f"{p}: expected a mapping with a non-empty 'coupons' list")
    basket = float(doc.get("expected_basket", 60.0))
    shipping = float(doc.get("shipping_cost", 4.9))
    coupons = tuple(_coupon(c, basket, shipping, str(p)) for c in doc["coupons"])
    ids = [c.id for c in coupons]
    if len(set(ids)) != len(ids):
        raise CatalogError(f"{p}: duplicate coupon ids in {ids}")
    return Catalog(coupons, basket, shipping)
