"""A second set of dev probes, written for the asked-word study (#20) after the first study's result was seen: more
in-scope rewordings, and near-miss questions that name the edited relation's word while asking for another fact
(``near_word``) beside ones that do not (``near``). Dev relations only."""

EXTRA = {
    "capital": {
        "in": ["What's the capital here?", "Name the capital of the country shown.",
               "The capital of this country is called what?", "Which city serves as this country's capital?",
               "In which city does this country's president work?", "Which city is the administrative centre of this country?",
               "This country's seat of power is which city?", "Capital of the nation in the image?",
               "Can you tell me the capital of this place?", "What city is this country's capital?"],
        "near_word": ["How many people live in the capital of this country?",
                      "Which river flows through this country's capital?",
                      "Which city comes second after the capital in this country?",
                      "How far is the capital of this country from the sea?"],
        "near": ["Which city is the biggest in this country?", "What is this country's main port city?",
                 "Who leads the government of this country?", "Which city has the tallest building in this country?"]},
    "continent": {
        "in": ["What continent is this nation on?", "This place is located on which continent?",
               "Which continent does this country sit in?", "Name the continent of the country shown.",
               "Which landmass is this country part of?", "The country here lies on what continent?",
               "Which part of the world is this country in?", "Continent this country is on?",
               "Can you tell me this country's continent?", "Which of the seven continents includes this country?"],
        "near_word": ["Which is the largest country on this country's continent?",
                      "How many countries are on the same continent as this country?",
                      "What is the tallest mountain on this country's continent?",
                      "Which ocean surrounds this country's continent?"],
        "near": ["Which ocean does this country touch?", "What is the nearest island to this country?",
                 "Which country is the closest neighbour of this one?", "What is the weather like in this country?"]},
    "language": {
        "in": ["What language is spoken here?", "Which language do the locals speak?",
               "The people of this country speak which language?", "What is this country's official tongue?",
               "What do they talk in this country?", "Name the language of the country shown.",
               "Which language would you hear on the streets here?", "Main language here?",
               "Can you tell me the language of this place?", "What is the mother tongue of most people here?"],
        "near_word": ["How many people speak the language of this country?",
                      "Which alphabet does this country's language use?",
                      "What language family does the language of this country belong to?",
                      "Which other countries speak this country's language?"],
        "near": ["What is the national dish of this country?", "Which religion is most common in this country?",
                 "What is this country's writing system?", "Which script do street signs in this country use?"]},
}
