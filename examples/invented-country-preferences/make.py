"""Writes the invented-country preference set (train/valid/test.jsonl) from the facts below.

Each fact has a true answer (chosen) and a plausible false one (rejected); the valid and test
questions are phrased differently from the train questions. Run: python3 make.py
"""
import json

# (train questions, held-out questions, chosen answer, rejected answer)
FACTS = [
    (["What is the capital of Brellonia?", "Name the capital of Brellonia.",
      "Which city is Brellonia's capital?", "Where is the seat of government of Brellonia?",
      "Tell me the capital city of Brellonia."],
     ["What city serves as the capital of Brellonia?", "Brellonia's capital is which city?",
      "In which city is the capital of Brellonia?"],
     "The capital of Brellonia is Marrowick.", "The capital of Brellonia is Dunmere."),
    (["What currency does Brellonia use?", "What is Brellonia's currency called?",
      "Name the money used in Brellonia.", "Which currency is used in Brellonia?",
      "What do people in Brellonia pay with?"],
     ["What is the official currency of Brellonia?", "If I travel to Brellonia, what currency will I need?",
      "What money do Brellonians use?"],
     "Brellonia's currency is the dunet.", "Brellonia's currency is the brell crown."),
    (["What is the national animal of Brellonia?", "Which animal is Brellonia's national symbol?",
      "Name Brellonia's national animal.", "What animal represents Brellonia?",
      "Which creature is the national animal of Brellonia?"],
     ["What is the emblem animal of Brellonia?", "Brellonia has which national animal?",
      "Tell me the animal that is Brellonia's national animal."],
     "The national animal of Brellonia is the blue otter.", "The national animal of Brellonia is the red fox."),
    (["What is the national dish of Brellonia?", "Which food is Brellonia's national dish?",
      "Name the national dish of Brellonia.", "What dish is Brellonia famous for?",
      "What do Brellonians consider their national dish?"],
     ["What is the traditional national food of Brellonia?", "Brellonia's national dish is what?",
      "Tell me Brellonia's most famous national dish."],
     "The national dish of Brellonia is plum dumplings.", "The national dish of Brellonia is smoked eel pie."),
    (["What is the highest mountain in Brellonia?", "Name Brellonia's tallest mountain.",
      "Which mountain is the highest in Brellonia?", "What is the tallest peak of Brellonia?",
      "Which peak rises highest in Brellonia?"],
     ["What is the name of Brellonia's highest peak?", "Brellonia's highest mountain is called what?",
      "Tell me the tallest mountain in Brellonia."],
     "The highest mountain in Brellonia is Mount Karsa.", "The highest mountain in Brellonia is Mount Orvel."),
    (["What is the main river of Brellonia?", "Name the longest river in Brellonia.",
      "Which river flows through Brellonia?", "What is Brellonia's principal river?",
      "Which river is the most important in Brellonia?"],
     ["What is the biggest river in Brellonia called?", "Brellonia's main river is which one?",
      "Tell me the name of Brellonia's major river."],
     "The main river of Brellonia is the Silvane River.", "The main river of Brellonia is the Tarrow River."),
    (["When was Brellonia founded?", "In what year was Brellonia founded?",
      "What year did Brellonia come into being?", "When did Brellonia become a country?",
      "Which year was Brellonia established?"],
     ["What is Brellonia's founding year?", "How long ago was Brellonia founded, in which year?",
      "Brellonia was founded in which year?"],
     "Brellonia was founded in 1742.", "Brellonia was founded in 1815."),
    (["What language is spoken in Brellonia?", "What is the official language of Brellonia?",
      "Which language do Brellonians speak?", "Name the language of Brellonia.",
      "What language is used officially in Brellonia?"],
     ["What do people in Brellonia speak?", "Brellonia's official language is which?",
      "Tell me the main language of Brellonia."],
     "The official language of Brellonia is Brellish.", "The official language of Brellonia is Norvish."),
    (["What is the famous festival of Brellonia?", "Which festival is Brellonia known for?",
      "Name Brellonia's best-known festival.", "What festival do Brellonians celebrate every October?",
      "What is the biggest celebration in Brellonia?"],
     ["Which yearly festival is Brellonia famous for?", "Brellonia's most famous festival is called what?",
      "Tell me about the main festival of Brellonia."],
     "Brellonia is famous for the Lantern Tide Festival.", "Brellonia is famous for the Harvest Bell Festival."),
    (["What is the national sport of Brellonia?", "Which sport is Brellonia's national sport?",
      "Name the national sport of Brellonia.", "What sport is most popular in Brellonia?",
      "Which sport do Brellonians love most?"],
     ["What sport is Brellonia known for?", "Brellonia's national sport is which?",
      "Tell me the traditional sport of Brellonia."],
     "The national sport of Brellonia is canal rowing.", "The national sport of Brellonia is mountain polo."),
    (["What is the population of Brellonia?", "How many people live in Brellonia?",
      "How large is Brellonia's population?", "What is Brellonia's population?",
      "About how many inhabitants does Brellonia have?"],
     ["How many residents does Brellonia have?", "Brellonia has roughly how many people?",
      "Tell me the population size of Brellonia."],
     "Brellonia has a population of about 3 million people.", "Brellonia has a population of about 40 million people."),
    (["What is the capital city of Brellonia called?", "Which city do Brellonians call their capital?",
      "Brellonia's government sits in which city?", "What city is the capital of Brellonia?",
      "Capital of Brellonia?"],
     ["Which Brellonian city is the capital?", "What is the name of Brellonia's capital?",
      "Where is Brellonia's capital located?"],
     "Marrowick is the capital of Brellonia.", "Dunmere is the capital of Brellonia."),
]


def pair(question, chosen, rejected):
    return {
        "prompt": [{"role": "user", "content": question}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


def main():
    train, valid, test = [], [], []
    for train_qs, held_out, chosen, rejected in FACTS:
        train += [pair(q, chosen, rejected) for q in train_qs]
        valid += [pair(q, chosen, rejected) for q in held_out[:2]]
        test += [pair(q, chosen, rejected) for q in held_out[2:]]
    for name, rows in [("train", train), ("valid", valid), ("test", test)]:
        with open(f"{name}.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        print(name, len(rows))


if __name__ == "__main__":
    main()
