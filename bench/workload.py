"""A synthetic shop: customers who browse and buy, and three fraud patterns, as the JSON
transactions and navigation events fraudstream reads. Used by `gen_payloads.py` (files for
`kafka-producer-perf-test --payload-file`).

Each purchase is a session: page and product views, cart adds (10 navigation events per
purchase on average), then the payment with the session id, the customer's device, IP, card
and e-mail. Fraud, `fraud_share` of the purchases, is one of:

- card testing: 8-15 payments of 0.50-3.00 within two minutes at different merchants, from a
  device and IP the customer never used, with no browsing;
- account takeover: failed logins, then a login and an immediate purchase from a new device,
  no browsing, for 5-20x the customer's usual amount;
- amount spike: a purchase 30-100x the merchant's usual amount, on the customer's own device.

Transactions carry `is_fraud` (and `pattern`); fraudstream ignores unknown fields.
"""

import json
import random

CATEGORIES = ["grocery_pos", "shopping_net", "misc_net", "gas_transport", "entertainment",
              "food_dining", "health_fitness", "home", "kids_pets", "travel"]
NAV_KINDS = ["page_view"] * 6 + ["product_view"] * 3 + ["cart_add"]


class Shop:
    def __init__(self, customers=5000, merchants=200, fraud_share=0.01, seed=1):
        self.rng = random.Random(seed)
        r = self.rng
        self.fraud_share = fraud_share
        self.customers = []
        for i in range(customers):
            lat, lon = r.uniform(25, 48), r.uniform(-122, -70)
            self.customers.append({
                "id": f"cust-{i}", "card": f"tok-{i:06d}", "email": f"user{i}@example.com",
                "device": f"dev-{i}", "ip": f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}",
                "lat": round(lat, 4), "lon": round(lon, 4),
                "dob": f"{r.randint(1945, 2004)}-{r.randint(1, 12):02d}-{r.randint(1, 28):02d}",
                "pop": int(r.lognormvariate(9, 2)) + 100, "mean": r.lognormvariate(3.5, 0.7),
            })
        self.merchants = [{
            "id": f"m-{j}", "category": r.choice(CATEGORIES), "scale": r.lognormvariate(3.3, 0.8),
            "lat": round(r.uniform(25, 48), 4), "lon": round(r.uniform(-122, -70), 4),
        } for j in range(merchants)]
        self.n = 0

    def _id(self, prefix):
        self.n += 1
        return f"{prefix}-{self.n}"

    def _tx(self, c, m, amount, t, session, device, ip, fraud, pattern):
        return ("tx", c["id"], {
            "transaction_id": self._id("tx"), "event_time": t, "customer_id": c["id"],
            "merchant_id": m["id"], "merchant_category": m["category"],
            "amount": round(max(amount, 0.5), 2), "currency": "USD", "card_id": c["card"],
            "email": c["email"], "device_id": device, "ip": ip, "channel": "web",
            "session_id": session, "customer_lat": c["lat"], "customer_lon": c["lon"],
            "merchant_lat": m["lat"], "merchant_lon": m["lon"], "customer_birth_date": c["dob"],
            "customer_city_pop": c["pop"], "is_fraud": int(fraud), "pattern": pattern,
        })

    def _nav(self, c, kind, t, session, device, ip):
        return ("nav", c["id"], {
            "event_id": self._id("ev"), "event_time": t, "customer_id": c["id"],
            "session_id": session, "kind": kind, "device_id": device, "ip": ip,
        })

    def purchase(self, t):
        """The events of one purchase ending at `t` (ms): (kind, key, event) in time order."""
        r = self.rng
        c = r.choice(self.customers)
        m = r.choice(self.merchants)
        session = self._id("s")
        if r.random() >= self.fraud_share:
            views = max(1, int(r.expovariate(1 / 10)))
            out = [self._nav(c, r.choice(NAV_KINDS), t - (views - k) * 2000, session, c["device"], c["ip"])
                   for k in range(views)]
            amount = c["mean"] * r.lognormvariate(0, 0.5) * m["scale"] / 27
            return out + [self._tx(c, m, amount, t, session, c["device"], c["ip"], False, "")]
        pattern = r.choice(["card-testing", "account-takeover", "amount-spike"])
        device, ip = f"dev-x{r.randint(0, 10**6)}", f"172.16.{r.randint(0, 255)}.{r.randint(0, 255)}"
        if pattern == "card-testing":
            k = r.randint(8, 15)
            return [self._tx(c, r.choice(self.merchants), r.uniform(0.5, 3.0), t - (k - i) * 8000,
                             self._id("s"), device, ip, True, pattern) for i in range(k)]
        if pattern == "account-takeover":
            out = [self._nav(c, "login_failed", t - 9000 + i * 1000, session, device, ip) for i in range(3)]
            out.append(self._nav(c, "login_ok", t - 4000, session, device, ip))
            return out + [self._tx(c, m, c["mean"] * r.uniform(5, 20), t, session, device, ip, True, pattern)]
        out = [self._nav(c, "page_view", t - 3000, session, c["device"], c["ip"])]
        return out + [self._tx(c, m, m["scale"] * r.uniform(30, 100), t, session, c["device"], c["ip"], True, pattern)]


def encode(event):
    return json.dumps(event, separators=(",", ":"))
