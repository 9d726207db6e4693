"""The built-in prompt set: two or three questions for each of Spec-Bench's six task kinds, written
for forerun. Categories: writing and coding (MT-Bench style, two turns), translation, summarization,
qa, math_reasoning and rag. Each entry is (category, turns)."""

_HARBOR = (
    "The town of Vellmar sits at the mouth of a narrow bay on a rocky northern coast. For three centuries "
    "its economy rested on herring: boats left before dawn, returned by noon, and the catch was salted in "
    "long sheds along the harbor wall. When the herring stocks collapsed in the 1970s, half the fleet was "
    "sold within a decade and the population fell from about 9,000 to 5,500. The council first tried to "
    "attract a fish-processing plant, which opened in 1984 and closed in 1991 after imports made it "
    "unprofitable. The turn came from an unexpected direction. A marine biology station, founded in 1996 "
    "in one of the old salting sheds, began to study the kelp forests offshore, and its researchers "
    "persuaded the town to protect the bay. Diving schools followed, then small hotels, and by 2015 "
    "tourism employed more people than fishing ever had. Not everyone welcomed the change: older "
    "residents complain that summer rents have tripled and that the harbor now serves visitors rather "
    "than workers. The council's current plan is to build 200 affordable homes on the site of the former "
    "processing plant and to cap the number of short-term holiday rentals in the old town."
)

_BATTERY = (
    "Sodium-ion batteries work on the same principle as lithium-ion cells: ions shuttle between two "
    "electrodes through an electrolyte while electrons flow through the external circuit. Sodium is "
    "about a thousand times more abundant in the Earth's crust than lithium and can be extracted from "
    "seawater, so the raw material is cheap and widely available. The main drawback is energy density. "
    "Sodium ions are larger and heavier than lithium ions, and current sodium-ion cells store roughly "
    "140 to 160 watt-hours per kilogram, compared with 200 to 280 for common lithium-ion chemistries. "
    "This makes them less attractive for phones and long-range cars, where weight matters most. On the "
    "other hand, sodium-ion cells keep more of their capacity in the cold, retaining around 90 percent "
    "at minus 20 degrees Celsius, and they can be discharged completely to zero volts for shipping, "
    "which lithium-ion cells cannot tolerate. They also avoid cobalt and nickel in many designs. "
    "Analysts expect the first large markets to be stationary storage for solar and wind farms, "
    "two-wheelers and short-range city cars."
)

_LIBRARY_POLICY = (
    "Document 1 (Loan rules): Members may borrow up to 12 items at a time. Books are lent for 21 days "
    "and may be renewed twice online unless another member has reserved them. Films and games are lent "
    "for 7 days and cannot be renewed.\n"
    "Document 2 (Fees): The library charges no fines for late books since January 2022. Items not "
    "returned 30 days after the due date are marked lost, and the member is billed the replacement "
    "cost plus a processing fee of 5 euros. The bill is cancelled if the item is returned in good "
    "condition within 60 days.\n"
    "Document 3 (Opening hours): The central branch opens Monday to Saturday from 9:00 to 20:00 and on "
    "Sunday from 12:00 to 17:00. Branch libraries close at 18:00 on weekdays and are closed on Sundays. "
    "Return boxes at every branch are emptied each morning, and items dropped there count as returned "
    "on the previous day."
)

_CLINIC_NOTES = (
    "Passage A: The Riverside clinic moved to 14 Mill Street in March. Its phone number did not change. "
    "Appointments can be booked online or by phone between 8:00 and 12:00.\n"
    "Passage B: Riverside offers vaccinations for adults on Tuesdays and Thursdays without appointment. "
    "Children's vaccinations require an appointment with the pediatric nurse, who works Monday, "
    "Wednesday and Friday.\n"
    "Passage C: Parking at Mill Street is limited to 12 spaces, two of them reserved for disabled "
    "drivers. Bus lines 4 and 17 stop directly in front of the building."
)

QUESTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("writing", (
        "Write a short blog post about spending a rainy weekend in a small coastal town, with three "
        "concrete things to do indoors.",
        "Now rewrite your post as a limerick-style poem of at most eight lines.",
    )),
    ("writing", (
        "Draft a polite email to a neighbor asking them to keep their dog from barking early in the "
        "morning. Keep it under 150 words.",
        "Make the email more formal and add a suggestion for a friendly solution.",
    )),
    ("coding", (
        "Write a Python function that returns the n-th Fibonacci number using iteration, with a "
        "docstring and two example calls.",
        "Now change the function so it returns the whole list of the first n numbers, and explain the "
        "change in one sentence.",
    )),
    ("translation", (
        "Translate the following German sentence into English: Der Zug nach Hamburg hatte heute "
        "Morgen wegen eines Sturms fast zwei Stunden Verspätung.",
    )),
    ("translation", (
        "Translate into English: Le marché du samedi attire des producteurs de toute la région, qui "
        "vendent des fromages, du pain et des légumes de saison.",
    )),
    ("summarization", (
        "Summarize the following article in three sentences.\n\n" + _HARBOR,
    )),
    ("summarization", (
        "Summarize the main advantages and disadvantages described in this text.\n\n" + _BATTERY,
    )),
    ("qa", ("What is the difference between weather and climate? Answer in two or three sentences.",)),
    ("qa", ("Why do leaves change color in autumn?",)),
    ("math_reasoning", (
        "A shop sells pencils in packs of 6 for 2 euros and in packs of 10 for 3 euros. What is the "
        "cheapest way to buy exactly 26 pencils? Explain your reasoning step by step.",
    )),
    ("math_reasoning", (
        "A train travels 180 km at 90 km/h and then 120 km at 60 km/h. What is its average speed over "
        "the whole trip? Show your steps.",
    )),
    ("rag", (
        "Answer the question using only the documents below.\n\n" + _LIBRARY_POLICY + "\n\nQuestion: "
        "I borrowed a film and a book on the same day. When is each due, and what happens if I return "
        "the book 40 days late?",
    )),
    ("rag", (
        "Use the passages to answer.\n\n" + _CLINIC_NOTES + "\n\nQuestion: Where is the Riverside "
        "clinic now, and when can I bring my daughter for a vaccination?",
    )),
)
