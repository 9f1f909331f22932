"""Offline training text for the demo SAE: generated chats plus prose from the Python standard library.

Nothing here needs the network. The chats are built from small fact tables with a seeded RNG so a
rebuild sees the same text; they carry the chat template's markup so features relate to
conversation, which is what the demo serves. The stdlib gives real English prose (docstrings, the
language reference in `pydoc_data`) and some code.
"""

from __future__ import annotations

import ast
import random
import sysconfig
from pathlib import Path

Conversation = list[dict[str, str]]

COUNTRIES = [
    ("France", "Paris", "French", "croissants and cheese", "the Eiffel Tower"),
    ("Italy", "Rome", "Italian", "pizza and pasta", "the Colosseum"),
    ("Spain", "Madrid", "Spanish", "paella and tapas", "the Sagrada Familia"),
    ("Germany", "Berlin", "German", "pretzels and sausages", "the Brandenburg Gate"),
    ("Japan", "Tokyo", "Japanese", "sushi and ramen", "Mount Fuji"),
    ("China", "Beijing", "Mandarin Chinese", "dumplings and Peking duck", "the Great Wall"),
    ("India", "New Delhi", "Hindi", "curry and naan", "the Taj Mahal"),
    ("Egypt", "Cairo", "Arabic", "koshari and falafel", "the pyramids of Giza"),
    ("Brazil", "Brasília", "Portuguese", "feijoada and pão de queijo", "the Christ the Redeemer statue"),
    ("Mexico", "Mexico City", "Spanish", "tacos and mole", "the pyramids of Teotihuacan"),
    ("Canada", "Ottawa", "English and French", "poutine and maple syrup", "Niagara Falls"),
    ("Australia", "Canberra", "English", "meat pies and Vegemite", "the Sydney Opera House"),
    ("Russia", "Moscow", "Russian", "borscht and blini", "the Red Square"),
    ("the United Kingdom", "London", "English", "fish and chips", "Big Ben"),
    ("Greece", "Athens", "Greek", "moussaka and souvlaki", "the Acropolis"),
    ("Turkey", "Ankara", "Turkish", "kebabs and baklava", "the Hagia Sophia"),
    ("Kenya", "Nairobi", "Swahili and English", "ugali and nyama choma", "the Maasai Mara"),
    ("Argentina", "Buenos Aires", "Spanish", "asado and empanadas", "the Iguazu Falls"),
    ("Peru", "Lima", "Spanish", "ceviche", "Machu Picchu"),
    ("Norway", "Oslo", "Norwegian", "salmon and brown cheese", "the fjords"),
    ("Portugal", "Lisbon", "Portuguese", "custard tarts", "the Belém Tower"),
    ("South Korea", "Seoul", "Korean", "kimchi and bibimbap", "Gyeongbokgung Palace"),
    ("Thailand", "Bangkok", "Thai", "pad thai and green curry", "the Grand Palace"),
    ("Ireland", "Dublin", "English and Irish", "Irish stew", "the Cliffs of Moher"),
]

ANIMALS = [
    ("cat", "meows", "a small carnivore that people keep as a pet", "fish and meat"),
    ("dog", "barks", "a loyal companion that was domesticated from wolves", "meat and kibble"),
    ("cow", "moos", "a large farm animal that gives milk", "grass and hay"),
    ("lion", "roars", "a big cat that lives on the African savanna", "zebras and antelopes"),
    ("elephant", "trumpets", "the largest land animal, with a long trunk", "grass, fruit and bark"),
    ("owl", "hoots", "a night bird with large eyes", "mice and insects"),
    ("horse", "neighs", "a strong animal that people have ridden for thousands of years", "grass and oats"),
    ("frog", "croaks", "an amphibian that starts life as a tadpole", "insects and worms"),
    ("snake", "hisses", "a legless reptile that smells with its tongue", "mice, eggs and frogs"),
    ("duck", "quacks", "a water bird with webbed feet", "seeds, plants and small fish"),
    ("bee", "buzzes", "an insect that makes honey and pollinates flowers", "nectar and pollen"),
    ("wolf", "howls", "a wild dog that hunts in packs", "deer and rabbits"),
    ("dolphin", "clicks and whistles", "a clever marine mammal", "fish and squid"),
    ("penguin", "squawks", "a bird that cannot fly but swims very well", "fish and krill"),
]

TOPICS = [
    ("weather", "It is sunny and warm today, a great day for a walk in the park.",
     "The forecast says it will rain tomorrow, so take an umbrella and a coat."),
    ("music", "The guitar, the piano and the violin are popular instruments to learn.",
     "Jazz grew out of blues and ragtime in New Orleans in the early twentieth century."),
    ("sports", "Football is the most popular sport in the world, played by two teams of eleven.",
     "In tennis, a match is won by the player who takes the most sets."),
    ("space", "The Moon orbits the Earth about once every twenty-seven days.",
     "Jupiter is the largest planet in the solar system, and Mars is called the red planet."),
    ("health", "Drinking water, sleeping well and walking every day keep the body healthy.",
     "A balanced diet has vegetables, fruit, whole grains and some protein."),
    ("cooking", "To boil an egg, put it in boiling water for seven minutes, then cool it.",
     "Bread is made from flour, water, yeast and salt, kneaded and baked in an oven."),
    ("history", "The Second World War ended in 1945.",
     "The Roman Empire was one of the largest empires of the ancient world."),
    ("science", "Water boils at 100 degrees Celsius at sea level.",
     "Plants turn sunlight, water and carbon dioxide into sugar and oxygen by photosynthesis."),
    ("feelings", "It is normal to feel sad sometimes; talking to a friend can help.",
     "When you feel stressed, slow breathing and a short break can calm you down."),
    ("travel", "Pack light, keep your passport safe and learn a few words of the local language.",
     "Trains are a relaxing way to travel between cities in Europe."),
    ("money", "A budget helps you track how much you earn and how much you spend.",
     "Saving a little every month adds up over the years thanks to interest."),
    ("colors", "Red, yellow and blue are the primary colors of paint.",
     "Mixing blue and yellow makes green, and red and white make pink."),
]

CODE_TASKS = [
    ("reverse a string in Python", "def reverse(text):\n    return text[::-1]"),
    ("add two numbers in Python", "def add(a, b):\n    return a + b"),
    ("read a file in Python", "with open('data.txt') as f:\n    content = f.read()"),
    ("sort a list in Python", "numbers = [3, 1, 2]\nnumbers.sort()\nprint(numbers)"),
    ("check if a number is even", "def is_even(n):\n    return n % 2 == 0"),
    ("loop over a dictionary", "for key, value in ages.items():\n    print(key, value)"),
    ("print hello world in JavaScript", "console.log('Hello, world!');"),
    ("compute a factorial", "def factorial(n):\n    return 1 if n <= 1 else n * factorial(n - 1)"),
]

# Requests with hand-written answers in registers the fact tables lack: stories, advice, letters,
# poems, reviews. Real chats wander far beyond capitals and animals.
WRITING = [
    ("Write a short story about a lost key.",
     "Maya searched every pocket twice before she gave up and sat on the steps. The rain had stopped, and a "
     "robin hopped across the wet grass. When she stood to leave, something glinted under the doormat: the "
     "key had been waiting there all along, exactly where she had hidden it that morning."),
    ("Tell me a bedtime story.",
     "Once upon a time, a little fox lived at the edge of a quiet forest. Every night she counted the stars "
     "until her eyes grew heavy. One evening a star winked back at her, and she smiled, curled her tail around "
     "her nose and drifted off to sleep. The end."),
    ("Write a poem about the city at night.",
     "Neon hums on empty streets,\nthe last bus sighs and rolls away,\nwindows glow like scattered coins\n"
     "while the city dreams of day."),
    ("I feel nervous about my exam tomorrow.",
     "That is completely understandable. Review your notes once more, then stop and rest. Get a good night's "
     "sleep, eat breakfast, and arrive early. You have prepared, and a little nervousness can even help you focus."),
    ("My friend is angry with me. What should I do?",
     "Give them a little time, then talk honestly. Listen to how they feel without interrupting, say sorry for "
     "your part, and ask what would help. Most friendships grow stronger after a difficult conversation."),
    ("Write a thank-you note to my teacher.",
     "Dear Mrs. Lee, thank you for your patience and encouragement this year. Your lessons made me curious "
     "about the world, and I will always remember your kindness. With gratitude, Sam."),
    ("Write an email asking my manager for a day off.",
     "Hi Anna, I would like to request a day off on Friday for a family event. My tasks are on schedule, and "
     "Tom has agreed to cover any urgent requests. Please let me know if that works. Best regards, Chris."),
    ("Review the restaurant I went to yesterday.",
     "The food was delicious and the portions were generous, although the service was slow on a busy evening. "
     "The soup was the highlight. I would go back, but I would book a table first."),
    ("Describe a rainy day.",
     "Grey clouds hang low over the roofs, and the rain taps steadily on the windows. People hurry past with "
     "umbrellas, puddles spread across the pavement, and the air smells of wet earth."),
    ("Write a funny joke.",
     "Why did the scarecrow win an award? Because he was outstanding in his field!"),
    ("How can I sleep better?",
     "Keep a regular bedtime, avoid screens for an hour before bed, and keep your room dark and cool. Skip "
     "coffee in the afternoon, and try reading or slow breathing to wind down."),
    ("Summarize the plot of Romeo and Juliet.",
     "Two young lovers from feuding families in Verona marry in secret. A chain of misunderstandings follows, "
     "and the story ends in tragedy when both die, which finally reconciles their families."),
    ("Give me ideas for a birthday party.",
     "You could host a picnic in the park, a movie night with homemade popcorn, a costume party, or a "
     "treasure hunt. Pick a theme your friend loves and build the food and games around it."),
    ("What makes a good leader?",
     "A good leader listens, communicates clearly and takes responsibility. They trust their team, give "
     "credit generously and stay calm when things go wrong."),
    ("Describe your ideal holiday.",
     "A quiet cabin by a lake in the mountains, long walks through pine forests, fresh bread in the morning "
     "and evenings by the fire with a good book."),
    ("Tell me about the ocean.",
     "The ocean covers more than seventy percent of the planet. It is home to whales, coral reefs and "
     "countless fish, and its currents carry heat around the world and shape our weather."),
    ("Why do people like football?",
     "Football is simple to play, exciting to watch and brings people together. Fans share the joy of a goal "
     "and the pain of a defeat, and supporting a team can feel like belonging to a family."),
    ("Explain how a car engine works.",
     "Fuel mixes with air inside the cylinders, a spark ignites it, and the small explosion pushes a piston "
     "down. The pistons turn a crankshaft, which finally turns the wheels."),
    ("What is the meaning of life?",
     "People have answered that in many ways: love, learning, helping others, creating something lasting. "
     "Many find meaning in small things, like friendship, curiosity and kindness."),
    ("Write a short news report about a local festival.",
     "Thousands of visitors filled the town square on Saturday for the annual summer festival. Local bands "
     "played until midnight, food stalls sold out by evening, and organizers called it the best year yet."),
]

SYSTEMS = [
    None,  # the template's default system prompt
    "You are a helpful assistant.",
    "You are a friendly tutor who explains things simply.",
    "You are a pirate. Answer like a pirate would.",
    "Answer in one short sentence.",
]

GREETINGS = ["Hi!", "Hello!", "Good morning.", "Hey there, how are you?", "Thanks for your help!"]
REPLIES = ["Hello! How can I help you today?", "Hi! What would you like to talk about?",
           "I'm doing well, thank you. How can I help?", "You're welcome! Have a great day."]


def _qa_pairs(rng: random.Random) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    for country, capital, language, food, landmark in COUNTRIES:
        pairs += [
            (f"What is the capital of {country}?", f"The capital of {country} is {capital}."),
            (f"Which language do people speak in {country}?", f"People in {country} mostly speak {language}."),
            (f"What food is {country} famous for?", f"{country[0].upper() + country[1:]} is famous for {food}."),
            (f"I am visiting {capital}. What should I see?",
             f"In {capital} you should not miss {landmark}, and try the local {food}."),
            (f"Tell me about {capital}.", f"{capital} is the capital of {country}, where people speak {language}."),
        ]
    for animal, sound, what, diet in ANIMALS:
        pairs += [
            (f"What sound does a {animal} make?", f"A {animal} {sound}."),
            (f"What is a {animal}?", f"A {animal} is {what}."),
            (f"What do {animal}s eat?", f"Most {animal}s eat {diet}."),
        ]
    for topic, first, second in TOPICS:
        pairs += [(f"Tell me something about {topic}.", first), (f"Can you explain more about {topic}?", second),
                  (f"Give me a fact about {topic}.", f"{first} {second}")]
    for task, code in CODE_TASKS:
        pairs.append((f"How do I {task}?", f"Here is a short example:\n\n```\n{code}\n```\n\nI hope this helps!"))
    for _ in range(40):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        op = rng.choice(["+", "-", "*"])
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        pairs.append((f"What is {a} {op} {b}?", f"{a} {op} {b} = {value}."))
    for greeting, reply in zip(GREETINGS, REPLIES * 2, strict=False):
        pairs.append((greeting, reply))
    pairs += WRITING * 3  # rare otherwise among the many short fact answers
    return pairs


def chat_conversations(seed: int = 0, count: int = 360) -> list[Conversation]:
    """Deterministic one- to three-turn chats drawn from the fact tables."""
    rng = random.Random(seed)
    pairs = _qa_pairs(rng)
    conversations: list[Conversation] = []
    for i in range(count):
        system = SYSTEMS[rng.randrange(len(SYSTEMS))]
        conv: Conversation = [{"role": "system", "content": system}] if system else []
        for _ in range(1 + (rng.random() < 0.35) + (rng.random() < 0.15)):
            question, answer = pairs[(i * 7 + rng.randrange(len(pairs))) % len(pairs)]
            conv += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        conversations.append(conv)
    return conversations


def _stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def docstring_texts(max_files: int = 220, min_chars: int = 200) -> list[str]:
    """Docstrings (module, class, function) of top-level stdlib modules: plain English prose."""
    texts: list[str] = []
    files = sorted(p for p in _stdlib_dir().glob("*.py") if not p.name.startswith("_"))[:max_files]
    for path in files:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError):
            continue
        for node in [tree, *ast.walk(tree)]:
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    texts.append(doc)
    return texts


def writing_texts() -> list[str]:
    """The hand-written answers again as plain prose, outside any chat markup."""
    return [answer for _, answer in WRITING]


def reference_texts() -> list[str]:
    """The language reference sections shipped in pydoc_data (what `help('if')` prints)."""
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def code_texts(max_files: int = 40) -> list[str]:
    """Some Python source, because users ask the chat model about code."""
    files = sorted(p for p in _stdlib_dir().glob("*.py") if not p.name.startswith("_"))
    return [p.read_text(encoding="utf-8", errors="replace") for p in files[::max(1, len(files) // max_files)]]
