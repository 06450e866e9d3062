"""Write the shipped real-model task: orders written in free text -> one JSON object (customer, item, quantity,
city). `python tools/make_orders_task.py` rewrites resources/datasets/orders_*.jsonl deterministically.

* `orders_train.jsonl` (300 examples) and `orders_train_40.jsonl` (its first 40): training data;
* `orders_heldout.jsonl` (40 examples): the held-out check, written with other sentence templates and other names,
  items and cities than any training example, so a score on it measures extraction, not memory.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "resources" / "datasets"
SYSTEM = ("Extract the order as JSON with the keys customer, item, quantity and city. "
          "Answer with the JSON object only.")

TRAIN_TEMPLATES = [
    "Hi, this is {customer}. Please send {quantity} {item} to {city}.",
    "{customer} would like to order {quantity} {item}, delivered to {city}.",
    "New order: {quantity} x {item} for {customer} in {city}.",
    "Could you ship {quantity} {item} to {city}? Thanks, {customer}",
    "Order from {customer} ({city}): {item}, quantity {quantity}.",
    "I need {quantity} {item} at my address in {city}. Name: {customer}.",
    "Please deliver {quantity} {item} to {customer}, {city}.",
    "{customer} here from {city}, I want {quantity} {item}.",
    "Ship to {city}: {quantity} {item}. Ordered by {customer}.",
    "Hello! {customer} in {city} orders {quantity} {item}, please.",
    "Customer {customer} requests {quantity} {item} for delivery in {city}.",
    "Put me down for {quantity} {item}, send them to {city}. - {customer}",
]
HELDOUT_TEMPLATES = [
    "Good morning, my name is {customer} and I'd like {quantity} {item} shipped to {city}.",
    "We in {city} need {quantity} {item} as soon as possible. Regards, {customer}",
    "{quantity} {item}, please, to {city}; the buyer is {customer}.",
    "Kindly arrange {quantity} {item} for {customer}. Destination: {city}.",
    "Purchase request by {customer}: {item} (qty {quantity}), deliver to {city}.",
    "Dear shop, {customer} from {city} wants to buy {quantity} {item}.",
    "Deliver to {city} - {quantity} {item} - for {customer}.",
    "Can I get {quantity} {item} sent over to {city}? This is {customer}.",
]
TRAIN_NAMES = ["Maria Lopez", "John Carter", "Aiko Tanaka", "Lukas Meyer", "Fatima Khan", "Oliver Smith",
               "Sofia Rossi", "Pierre Martin", "Ana Silva", "David Cohen", "Emma Johansson", "Ravi Patel",
               "Chen Wei", "Grace Okafor", "Tomasz Nowak", "Hannah Schmidt", "Carlos Mendez", "Yuki Sato",
               "Liam O'Brien", "Nadia Haddad", "Peter Novak", "Isabel Garcia", "Mohammed Ali", "Julia Weber"]
HELDOUT_NAMES = ["Elena Petrova", "Marcus Brown", "Priya Sharma", "Kenji Watanabe", "Laura Bianchi",
                 "Samuel Adeyemi", "Ingrid Larsen", "Diego Ramirez", "Zoe Taylor", "Omar Farouk"]
TRAIN_ITEMS = ["desk lamps", "coffee mugs", "office chairs", "notebooks", "USB cables", "water bottles",
               "backpacks", "phone cases", "wall clocks", "table fans", "yoga mats", "kitchen scales",
               "bath towels", "reading glasses", "garden hoses", "pillows"]
HELDOUT_ITEMS = ["bicycle helmets", "printer cartridges", "tea kettles", "winter gloves", "laptop stands",
                 "picture frames"]
TRAIN_CITIES = ["Berlin", "Madrid", "Toronto", "Osaka", "Lisbon", "Chicago", "Vienna", "Dublin", "Seoul",
                "Lyon", "Nairobi", "Oslo", "Austin", "Krakow", "Melbourne", "Milan"]
HELDOUT_CITIES = ["Hamburg", "Valencia", "Denver", "Kyoto", "Porto", "Zurich"]


def example(rng: random.Random, templates: list[str], names: list[str], items: list[str], cities: list[str]) -> dict:
    fields = {"customer": rng.choice(names), "item": rng.choice(items), "quantity": rng.randint(1, 60),
              "city": rng.choice(cities)}
    text = rng.choice(templates).format(**fields)
    return {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text},
                         {"role": "assistant", "content": json.dumps(fields)}]}


def write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def main() -> None:
    rng = random.Random(7)
    train = [example(rng, TRAIN_TEMPLATES, TRAIN_NAMES, TRAIN_ITEMS, TRAIN_CITIES) for _ in range(300)]
    heldout = [example(rng, HELDOUT_TEMPLATES, HELDOUT_NAMES, HELDOUT_ITEMS, HELDOUT_CITIES) for _ in range(40)]
    write(OUT / "orders_train.jsonl", train)
    write(OUT / "orders_train_40.jsonl", train[:40])
    write(OUT / "orders_heldout.jsonl", heldout)
    print(f"wrote {len(train)} training, 40 of them also as orders_train_40.jsonl, {len(heldout)} held out to {OUT}")


if __name__ == "__main__":
    main()
