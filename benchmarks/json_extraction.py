"""Speculation under a JSON schema against plain decoding under the same schema, on extraction prompts.

Each prompt is a short passage and a schema whose fields appear in it verbatim (names, dates, numbers,
places, titles, quoted phrases; nested objects and arrays in some): copy-heavy output, where prompt
lookup should find the values and the grammar forces the keys and punctuation. Every method runs a
prompt before the next prompt starts, so the machine's noise hits all alike; rounds repeat that, and
each method's tok/s is the median over rounds of its total tokens over total seconds. Greedy; every
output is parsed and validated against its schema, and compared token for token with `ar`'s.

    python benchmarks/json_extraction.py --threads 1 --rounds 3
    python benchmarks/json_extraction.py --methods ar,forced,pld+forced --prompts 4 --rounds 1   # a quick look

A method is a registered drafter name, "+forced" adds the grammar's forced tokens to its drafts
(SpecConfig.forced_tokens), and "forced" alone is `ar` with them: forced tokens as the only drafter.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics

import jsonschema
import torch

from forerun import LLM, SamplingParams, SpecConfig
from forerun.bench.harness import machine_description
from forerun.config import StructuredOutput


def _text(max_length: int = 80) -> dict:
    return {"type": "string", "maxLength": max_length}


def _object(**properties) -> dict:
    return {"type": "object", "additionalProperties": False, "required": list(properties), "properties": properties}


def _list(item: dict, most: int = 4) -> dict:
    return {"type": "array", "items": item, "minItems": 1, "maxItems": most}


YEAR = {"type": "integer", "minimum": 1000, "maximum": 2100}
COUNT = {"type": "integer", "minimum": 0, "maximum": 10_000_000}
SCHEMAS = {
    "person": _object(name=_text(), born=_text(40), birthplace=_text(), occupation=_text(), known_for=_text()),
    "event": _object(title=_text(), date=_text(40), venue=_object(name=_text(), city=_text()),
                     organizer=_text(), attendance=COUNT),
    "order": _object(order_id=_text(20), customer=_text(), items=_list(_object(product=_text(), quantity=COUNT)),
                     total=_text(20), ship_to=_text()),
    "book": _object(title=_text(), author=_text(), year=YEAR, publisher=_text(), quote=_text(120)),
    "company": _object(company=_text(), founded=YEAR, headquarters=_text(), ceo=_text(), revenue=_text(30),
                       employees=COUNT),
    "trip": _object(traveler=_text(), legs=_list(_object(origin=_text(), destination=_text(), date=_text(40),
                                                         flight=_text(12)))),
    "meeting": _object(subject=_text(), date=_text(40), attendees=_list(_text(), 5), decisions=_list(_text(120), 3)),
    "study": _object(title=_text(120), authors=_list(_text(), 4), journal=_text(), year=YEAR, finding=_text(160)),
}
PASSAGES = [  # (schema, passage)
    ("person", "Ada Lovelace was born on 10 December 1815 in London. A mathematician and writer, she is known "
               "for her notes on Charles Babbage's Analytical Engine, which contain the first published algorithm."),
    ("person", "Srinivasa Ramanujan, born 22 December 1887 in Erode, India, was a self-taught mathematician. He "
               "is known for the Ramanujan prime and his work on partitions of numbers."),
    ("person", "The architect Zaha Hadid was born on 31 October 1950 in Baghdad. She became known for the "
               "London Aquatics Centre, built for the 2012 Olympic Games."),
    ("person", "Grace Hopper (born 9 December 1906, New York City) was a computer scientist and United States "
               "Navy rear admiral, known for the first compiler, the A-0 System."),
    ("event", "The Nordic Jazz Festival opens on 14 June 2025 at the Koncerthuset in Copenhagen. Organized by "
              "the Danish Music Council, it expects an attendance of 12000 over three days."),
    ("event", "On 3 March 2024 the Pacific Robotics Summit took place at the Moscone Center in San Francisco. "
              "The organizer, RoboLeague Inc., reported 4500 attendees."),
    ("event", "The 2023 Lisbon Book Fair ran from 25 May at Parque Eduardo VII in Lisbon, organized by the "
              "Portuguese Publishers Association, with an attendance of 550000 visitors."),
    ("order", "Order #A-20931 was placed by Maria Gonzalez: 2 Ceramic Coffee Mugs and 1 French Press. The total "
              "came to $64.50, shipped to 18 Elm Street, Portland, Oregon."),
    ("order", "Customer Kenji Tanaka placed order B-7741 for 3 USB-C Cables, 1 Laptop Stand and 2 Wireless Mice. "
              "Total charged: $112.97. Ship to 4-2-8 Shibuya, Tokyo."),
    ("order", "Invoice for order 55019, customer Fatima Al-Sayed: 10 Notebook A5 Dotted and 5 Gel Pen Black. "
              "Total 38.40 EUR, delivered to Rue de la Paix 12, Paris."),
    ("book", "In 1851 Harper & Brothers published Moby-Dick by Herman Melville. Its first line is one of the most "
             "famous in literature: \"Call me Ishmael.\""),
    ("book", "Pride and Prejudice, written by Jane Austen, was published in 1813 by Thomas Egerton. It opens: "
             "\"It is a truth universally acknowledged, that a single man in possession of a good fortune, must be "
             "in want of a wife.\""),
    ("book", "George Orwell's Nineteen Eighty-Four appeared in 1949 from Secker & Warburg. Its opening sentence "
             "reads \"It was a bright cold day in April, and the clocks were striking thirteen.\""),
    ("company", "Nordwind Energy was founded in 1998 and is headquartered in Hamburg, Germany. Under CEO Lena "
                "Hoffmann it reported revenue of EUR 2.4 billion last year and employs 8200 people."),
    ("company", "Founded in 2011, Brightpath Logistics has its headquarters in Austin, Texas. Chief executive "
                "Marcus Reed announced revenue of $910 million, with 3400 employees worldwide."),
    ("company", "Tata Consultancy Services, founded in 1968 and headquartered in Mumbai, is led by CEO K. "
                "Krithivasan. It has about 600000 employees and revenue of $29 billion."),
    ("trip", "Itinerary for Olivia Brown: on 12 April she flies from Boston to Reykjavik on flight FI630, then "
             "on 15 April from Reykjavik to Oslo on flight FI318."),
    ("trip", "Travel plan, traveler Ahmed Karimi. Leg 1: Dubai to Singapore, 2 September, flight EK354. Leg 2: "
             "Singapore to Sydney, 6 September, flight QF2. Leg 3: Sydney to Auckland, 11 September, flight NZ104."),
    ("trip", "Sofia Rossi travels from Rome to Madrid on 8 July on flight IB3235 and returns from Madrid to Rome "
             "on 14 July on flight IB3238."),
    ("meeting", "Minutes of the Budget Review, 21 November 2024. Present: Anna Schmidt, David Lee, Priya Patel. "
                "Decided: freeze hiring until March; move the data center contract to Q2."),
    ("meeting", "Project Falcon kickoff on 5 February 2025 with Tom Becker, Chen Wei, Laura Martin and Jonas "
                "Berg. Decisions: weekly standups on Monday; release the beta on 30 April."),
    ("meeting", "Safety committee meeting, 17 January 2025. Attendees: Rosa Diaz, Omar Haddad. They decided to "
                "replace the fire extinguishers in Building C."),
    ("study", "\"Attention Is All You Need\" by Ashish Vaswani, Noam Shazeer and Niki Parmar appeared at NeurIPS "
              "in 2017. It found that a model based solely on attention mechanisms outperforms recurrent models "
              "on translation."),
    ("study", "In 2015 Nature published \"Human-level control through deep reinforcement learning\" by Volodymyr "
              "Mnih and David Silver, which found that a deep Q-network can learn to play Atari games from pixels."),
    ("study", "The paper \"Deep Residual Learning for Image Recognition\" by Kaiming He and Jian Sun (CVPR, 2016) "
              "found that residual connections make networks of over 100 layers easy to train."),
    ("study", "Published in Science in 2020, \"Coral reefs under rapid warming\" by Maria Lopez, John Park and "
              "Emma Stone found that reef cover fell by 14 percent between 2009 and 2018."),
]


def prompt_messages(schema_name: str, passage: str) -> list[dict]:
    return [{"role": "user", "content": f"Extract the fields from the passage as JSON matching this schema: "
                                        f"{json.dumps(SCHEMAS[schema_name])}\n\nPassage: {passage}"}]


def spec_of(method: str) -> SpecConfig:
    """"pld" -> pld without forced tokens, "pld+forced" with them, "forced" -> ar with them."""
    name, forced = method.removesuffix("+forced"), method.endswith("+forced")
    if name == "forced":
        name, forced = "ar", True
    return SpecConfig(method=name, forced_tokens=forced)


def valid(text: str, schema: dict) -> bool:
    try:
        jsonschema.validate(json.loads(text), schema)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="ar,forced,pld,pld+forced,auto+forced,recycle+forced,eagle+forced")
    p.add_argument("--quant", default="q4")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompts", type=int, default=len(PASSAGES))
    p.add_argument("--max-new-tokens", type=int, default=200)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    methods = a.methods.split(",")
    if methods[0] != "ar":
        raise SystemExit("the first method must be ar: the others are compared with it")
    llm = LLM(quant=a.quant)
    cases = [(name, llm.encode(prompt_messages(name, passage)),
              SamplingParams(max_new_tokens=a.max_new_tokens, structured=StructuredOutput(json=SCHEMAS[name])))
             for name, passage in PASSAGES[:a.prompts]]
    llm.generate_ids(cases[0][1], cases[0][2], spec_of("ar"))  # reads the vocabulary, warms up

    tokens = {m: [0] * a.rounds for m in methods}
    seconds = {m: [0.0] * a.rounds for m in methods}
    forwards = {m: 0 for m in methods}
    valid_count, differ = {m: 0 for m in methods}, {m: 0 for m in methods}
    for r in range(a.rounds):
        for k, (schema_name, ids, params) in enumerate(cases):
            reference = None
            for m in methods:
                out = llm.generate_ids(ids, params, spec_of(m))
                reference = reference or out.token_ids
                tokens[m][r] += len(out.token_ids)
                seconds[m][r] += out.stats.wall_s
                if r == 0:
                    forwards[m] += out.stats.target_forwards
                    valid_count[m] += valid(llm.tokenizer.decode(out.token_ids), SCHEMAS[schema_name])
                    differ[m] += out.token_ids != reference
            print(f"round {r + 1} prompt {k + 1}/{len(cases)} ({schema_name}): "
                  + ", ".join(f"{m} {tokens[m][r] / seconds[m][r]:.1f}" for m in methods), flush=True)

    rate = {m: statistics.median(t / s for t, s in zip(tokens[m], seconds[m])) for m in methods}
    print(f"\n{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; {machine_description()}")
    print(f"model {llm.runtime.name}; {len(cases)} prompts, {a.rounds} rounds, greedy, max {a.max_new_tokens} tokens, "
          f"{tokens['ar'][0]} tokens per method per round\n")
    print("| method | tok/s | vs ar | tau | valid | differ from ar |\n|---|---|---|---|---|---|")
    for m in methods:
        print(f"| {m} | {rate[m]:.1f} | {rate[m] / rate['ar']:.2f}x | {tokens[m][0] / forwards[m]:.2f} "
              f"| {valid_count[m] / len(cases):.0%} | {differ[m]} |")


if __name__ == "__main__":
    main()
