"""Writes tests/data/sparkov-sample.jsonl.gz: a slice of the Sparkov held-out test period as the
JSON transactions fraudstream reads, for the demo and the tests of the default model.

The slice: the first DAYS days of sparkov_test.csv.xz (the period the shipped model never
trained on), every card with a fraud in them plus a random draw of the others (seed
20261122), all their transactions in time order. Card numbers are replaced by pseudonyms
(`card-17`, customer `cust-17`); `is_fraud` is kept for scoring the demo (fraudstream ignores
unknown fields).

    python scripts/py/sparkov_sample.py ../shared/data/sparkov/sparkov_test.csv.xz tests/data/sparkov-sample.jsonl.gz
"""

import argparse
import gzip
import json

import numpy as np
import pandas as pd

DAYS = 21
OTHER_CARDS = 120
SEED = 20261122


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("test_csv")
    ap.add_argument("out")
    args = ap.parse_args()

    df = pd.read_csv(args.test_csv, dtype={"cc_num": str, "zip": str}, keep_default_na=False)
    t = pd.to_datetime(df["trans_date_trans_time"])
    df = df[t < t.iloc[0] + pd.Timedelta(days=DAYS)]
    fraud_cards = sorted(df.loc[df["is_fraud"] == 1, "cc_num"].unique())
    others = sorted(set(df["cc_num"]) - set(fraud_cards))
    rng = np.random.default_rng(SEED)
    chosen = set(fraud_cards) | set(rng.choice(others, size=OTHER_CARDS, replace=False))
    df = df[df["cc_num"].isin(chosen)]
    alias = {c: i for i, c in enumerate(sorted(chosen))}

    with gzip.GzipFile(args.out, "wb", mtime=0) as raw:
        for r in df.itertuples(index=False):
            n = alias[r.cc_num]
            tx = {
                "transaction_id": r.trans_num,
                "event_time": r.trans_date_trans_time.replace(" ", "T") + "Z",
                "customer_id": f"cust-{n}",
                "card_id": f"card-{n}",
                "merchant_id": r.merchant,
                "merchant_category": r.category,
                "amount": r.amt,
                "currency": "USD",
                "customer_lat": r.lat,
                "customer_lon": r.long,
                "merchant_lat": r.merch_lat,
                "merchant_lon": r.merch_long,
                "customer_birth_date": r.dob,
                "customer_gender": r.gender,
                "customer_city": r.city,
                "customer_state": r.state,
                "customer_zip": r.zip,
                "customer_city_pop": int(r.city_pop),
                "is_fraud": int(r.is_fraud),
            }
            raw.write((json.dumps(tx, separators=(",", ":")) + "\n").encode())
    print(f"{len(df)} transactions of {len(chosen)} cards ({len(fraud_cards)} with fraud), "
          f"{int(df['is_fraud'].sum())} frauds, {DAYS} days from {df['trans_date_trans_time'].iloc[0]}")


if __name__ == "__main__":
    main()
