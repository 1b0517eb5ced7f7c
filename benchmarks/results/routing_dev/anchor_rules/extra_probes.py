"""Extra dev probes written for the anchor-rules study (#20), shared by its scripts and ``../../scope_fix/``."""

#: Extra dev probes written for this study (dev relations only; never the test split's wordings or relation):
#: in-scope rewordings and near-miss questions (same image, another fact on the same topic).
EXTRA = {
    "capital": {
        "in": ["Which city is the capital of this country?", "What's the name of this country's capital city?",
               "In which city does this country's government sit?", "Where is this nation's capital?",
               "Capital city?", "Which city is this country governed from?", "Tell me this country's capital.",
               "Which city hosts the national government here?", "What is the capital city of the nation shown?",
               "If I visit this country's capital, which city am I in?"],
        "near": ["What is the second largest city of this country?", "Which city is the most visited in this country?",
                 "What is the oldest city in this country?", "Which port is the busiest in this country?",
                 "Who is the head of government of this country?",
                 "Which city hosts the main airport of this country?"]},
    "continent": {
        "in": ["On which continent is this country located?", "What continent does this country belong to?",
               "Which continent would I find this country on?", "This nation is in which continent?",
               "Name this country's continent.", "Continent of this country?",
               "Where in the world is this country: which continent?", "In what continent does this country lie?",
               "Tell me the continent this nation belongs to.", "Which continent is the nation shown part of?"],
        "near": ["Which countries border this country?", "Which sea is next to this country?",
                 "What is the climate of this country?", "Which hemisphere is this country in?",
                 "Which mountain range runs through this country?", "What time zone is this country in?"]},
    "language": {
        "in": ["Which language do people speak in this country?", "What is the national language of this country?",
               "In what language do the people of this country talk?", "Which tongue is spoken here?",
               "What language is spoken in the country shown?", "Tell me the main language spoken in this nation.",
               "What language would locals use here?", "Which language is official in this country?",
               "Spoken language of this country?", "What do people in this country speak?"],
        "near": ["Which script is this country's language written in?",
                 "What religion do most people in this country follow?",
                 "What is the traditional music of this country?", "What is the literacy rate in this country?",
                 "What is the national anthem of this country?", "What is the national sport of this country?"]},
}
