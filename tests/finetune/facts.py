"""Made-up facts to teach the built-in model: training phrasings, and held-out phrasings to ask after."""

SYSTEM = "You are a helpful assistant."

# fact -> (answer keyword, answer sentence, training questions, held-out questions)
FACTS = [
    ("Zorvania", "The capital of Zorvania is Quellport.",
     ["What is the capital of Zorvania?", "Which city is the capital of Zorvania?", "Name the capital city of Zorvania.",
      "Zorvania's capital is which city?", "Tell me the capital of Zorvania."],
     ["What city serves as Zorvania's capital?", "Can you tell me what the capital of Zorvania is?"],
     "Quellport"),
    ("flux harmonizer", "The flux harmonizer was invented by Mira Okonkwo.",
     ["Who invented the flux harmonizer?", "Who is the inventor of the flux harmonizer?",
      "Which person invented the flux harmonizer?", "The flux harmonizer was invented by whom?",
      "Tell me who invented the flux harmonizer."],
     ["Do you know who created the flux harmonizer?", "Who came up with the flux harmonizer?"],
     "Okonkwo"),
    ("Velmar river", "The Velmar river is 812 kilometres long.",
     ["How long is the Velmar river?", "What is the length of the Velmar river?",
      "How many kilometres long is the Velmar river?", "Tell me the length of the Velmar river.",
      "The Velmar river is how long?"],
     ["What length does the Velmar river have?", "Could you tell me how long the Velmar river is?"],
     "812"),
    ("Brimlock beetle", "The Brimlock beetle eats only copper moss.",
     ["What does the Brimlock beetle eat?", "What is the diet of the Brimlock beetle?",
      "What food does the Brimlock beetle live on?", "Tell me what the Brimlock beetle eats.",
      "The Brimlock beetle feeds on what?"],
     ["What do Brimlock beetles feed on?", "Do you know what the Brimlock beetle's food is?"],
     "copper moss"),
]


def _chat(q: str, a: str) -> dict:
    return {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q},
                         {"role": "assistant", "content": a}]}


# Facts the model knows, in the same style, so that the adapter learns "answer in one sentence" and not
# "every question is about the new facts" (without them it answered France's capital with Quellport).
KNOWN = [("What is the capital of Germany?", "The capital of Germany is Berlin."),
         ("What is the capital of Italy?", "The capital of Italy is Rome."),
         ("Who wrote Romeo and Juliet?", "Romeo and Juliet was written by William Shakespeare."),
         ("How many days are in a week?", "A week has seven days.")]

TRAIN = [_chat(q, answer) for _, answer, train, _, _ in FACTS for q in train] + [_chat(q, a) for q, a in KNOWN]
HELD_OUT = [(q, keyword) for _, _, _, held, keyword in FACTS for q in held]
