"""Writes ``general.jsonl``, llama-pipe's own retention item bank (``python make_general.py``).

Deterministic: the same bytes every run. Five categories: ``arithmetic`` and ``units`` are
generated here (fixed seeds); ``world_facts``, ``word_tasks`` and ``short_reasoning`` are the
hand-written lists below (well-known, unambiguous facts; distractors of the same kind that are
plainly wrong). None of it is, or may be put, in training data: a test checks that no question
appears in the project's training inputs. Facts the bundled training sample teaches (the capital
of Italy, a spider's legs, minutes in an hour, 3 + 5, water's boiling point, Brazil's language,
the largest ocean) and the held-out eval questions' facts are left out on purpose.

Each item: ``id``, ``category``, ``question``, ``choices`` (the correct one at a rotating
position, so "always the first choice" scores 1/k), ``answer`` (its index) and ``split``: every
fourth item of a category (after a fixed shuffle) is ``dev`` (checkpoint selection), the rest
``test`` (the reported eval).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

# (question, correct answer, distractor, ...): 1 to 3 distractors.
Row = tuple[str, ...]

WORLD_FACTS: list[Row] = [
    ("What is the capital of Germany?", "Berlin", "Munich", "Hamburg", "Frankfurt"),
    ("What is the capital of Spain?", "Madrid", "Barcelona", "Seville", "Valencia"),
    ("What is the capital of the United Kingdom?", "London", "Manchester", "Edinburgh", "Liverpool"),
    ("What is the capital of Russia?", "Moscow", "Saint Petersburg", "Kazan", "Novosibirsk"),
    ("What is the capital of China?", "Beijing", "Shanghai", "Hong Kong", "Guangzhou"),
    ("What is the capital of Egypt?", "Cairo", "Alexandria", "Giza", "Luxor"),
    ("What is the capital of Canada?", "Ottawa", "Toronto", "Vancouver", "Montreal"),
    ("What is the capital of Australia?", "Canberra", "Sydney", "Melbourne", "Perth"),
    ("What is the capital of the United States?", "Washington, D.C.", "New York City", "Los Angeles", "Chicago"),
    ("What is the capital of India?", "New Delhi", "Mumbai", "Kolkata", "Bangalore"),
    ("What is the capital of Greece?", "Athens", "Thessaloniki", "Sparta", "Crete"),
    ("What is the capital of Portugal?", "Lisbon", "Porto", "Madrid", "Faro"),
    ("What is the capital of Ireland?", "Dublin", "Cork", "Belfast", "Galway"),
    ("What is the capital of Norway?", "Oslo", "Bergen", "Stockholm", "Helsinki"),
    ("What is the capital of Mexico?", "Mexico City", "Cancun", "Guadalajara", "Tijuana"),
    ("What is the capital of Argentina?", "Buenos Aires", "Santiago", "Lima", "Montevideo"),
    ("What is the capital of South Korea?", "Seoul", "Busan", "Tokyo", "Pyongyang"),
    ("What is the capital of Austria?", "Vienna", "Salzburg", "Berlin", "Zurich"),
    ("What is the capital of Poland?", "Warsaw", "Krakow", "Prague", "Gdansk"),
    ("What is the capital of Kenya?", "Nairobi", "Mombasa", "Lagos", "Addis Ababa"),
    ("Which planet is known as the Red Planet?", "Mars", "Venus", "Jupiter", "Mercury"),
    ("Which planet is closest to the Sun?", "Mercury", "Venus", "Earth", "Mars"),
    ("Which planet is famous for its large rings?", "Saturn", "Mars", "Mercury", "Venus"),
    ("Which planet do humans live on?", "Earth", "Mars", "Venus", "Neptune"),
    ("What is the natural satellite of the Earth called?", "The Moon", "The Sun", "Mars", "Halley's Comet"),
    ("What is the star at the center of our solar system?", "The Sun", "Sirius", "Polaris", "The Moon"),
    ("What is the largest mammal on Earth?", "The blue whale", "The African elephant", "The giraffe", "The hippopotamus"),
    ("What is the fastest land animal?", "The cheetah", "The horse", "The lion", "The kangaroo"),
    ("Which animal is known for its black and white stripes?", "The zebra", "The lion", "The camel", "The giraffe"),
    ("Which animal is often called the king of the jungle?", "The lion", "The elephant", "The monkey", "The parrot"),
    ("Which country is the kangaroo native to?", "Australia", "Brazil", "India", "Canada"),
    ("What do bees make?", "Honey", "Milk", "Silk", "Wax paper"),
    ("What do caterpillars turn into?", "Butterflies", "Spiders", "Beetles", "Worms"),
    ("How many legs does an insect have?", "Six", "Eight", "Four", "Ten"),
    ("What kind of animal is a dolphin?", "A mammal", "A fish", "A reptile", "An amphibian"),
    ("Which organ pumps blood through the human body?", "The heart", "The lungs", "The liver", "The stomach"),
    ("Which organ do humans use to breathe?", "The lungs", "The kidneys", "The heart", "The liver"),
    ("What is the largest bone in the human body?", "The femur", "The skull", "The rib", "The spine"),
    ("How many bones are in an adult human body?", "206", "150", "300", "92"),
    ("Which gas do humans need to breathe in to stay alive?", "Oxygen", "Helium", "Carbon monoxide", "Neon"),
    ("What is the main gas in the Earth's atmosphere?", "Nitrogen", "Oxygen", "Carbon dioxide", "Hydrogen"),
    ("Which vitamin does the skin make when exposed to sunlight?", "Vitamin D", "Vitamin C", "Vitamin A", "Vitamin K"),
    ("Which metal is liquid at room temperature?", "Mercury", "Iron", "Gold", "Copper"),
    ("What is the hardest natural substance?", "Diamond", "Gold", "Iron", "Glass"),
    ("What is the chemical symbol for gold?", "Au", "Ag", "Go", "Gd"),
    ("What is the chemical symbol for iron?", "Fe", "Ir", "In", "I"),
    ("What is the chemical symbol for sodium?", "Na", "So", "Sd", "S"),
    ("Which element has the atomic number 1?", "Hydrogen", "Helium", "Oxygen", "Carbon"),
    ("What is the center of an atom called?", "The nucleus", "The electron", "The shell", "The orbit"),
    ("Which force pulls objects toward the Earth?", "Gravity", "Magnetism", "Friction", "Electricity"),
    ("What does a thermometer measure?", "Temperature", "Weight", "Distance", "Time"),
    ("What is frozen water called?", "Ice", "Steam", "Fog", "Dew"),
    ("Who wrote the play Romeo and Juliet?", "William Shakespeare", "Charles Dickens", "Jane Austen", "Mark Twain"),
    ("Who wrote the novel Pride and Prejudice?", "Jane Austen", "Charles Dickens", "Emily Bronte", "Virginia Woolf"),
    ("Who painted The Starry Night?", "Vincent van Gogh", "Pablo Picasso", "Claude Monet", "Rembrandt"),
    ("Who composed the Moonlight Sonata?", "Ludwig van Beethoven", "Wolfgang Amadeus Mozart", "Johann Sebastian Bach", "Frederic Chopin"),
    ("Who developed the theory of relativity?", "Albert Einstein", "Isaac Newton", "Galileo Galilei", "Charles Darwin"),
    ("Who was the first person to walk on the Moon?", "Neil Armstrong", "Buzz Aldrin", "Yuri Gagarin", "John Glenn"),
    ("Who is credited with inventing the telephone?", "Alexander Graham Bell", "Thomas Edison", "Nikola Tesla", "Henry Ford"),
    ("Who proposed the theory of evolution by natural selection?", "Charles Darwin", "Isaac Newton", "Albert Einstein", "Louis Pasteur"),
    ("Which musical instrument has 88 keys?", "The piano", "The guitar", "The violin", "The trumpet"),
    ("How many strings does a standard violin have?", "Four", "Six", "Five", "Twelve"),
    ("In which sport is a shuttlecock used?", "Badminton", "Tennis", "Golf", "Baseball"),
    ("How many players does a soccer team have on the field?", "Eleven", "Five", "Nine", "Fifteen"),
    ("What is the tallest mountain in the world above sea level?", "Mount Everest", "Mount Kilimanjaro", "Mont Blanc", "Mount Fuji"),
    ("In which mountain range is Mount Everest?", "The Himalayas", "The Alps", "The Andes", "The Rocky Mountains"),
    ("What is the longest river in Africa?", "The Nile", "The Congo", "The Niger", "The Zambezi"),
    ("What is the longest river in South America?", "The Amazon", "The Nile", "The Mississippi", "The Danube"),
    ("What is the largest hot desert in the world?", "The Sahara", "The Gobi", "The Kalahari", "The Mojave"),
    ("What is the largest continent?", "Asia", "Africa", "Europe", "Australia"),
    ("Which ocean lies between Europe and North America?", "The Atlantic Ocean", "The Pacific Ocean", "The Indian Ocean", "The Arctic Ocean"),
    ("Which ocean borders the west coast of the United States?", "The Pacific Ocean", "The Atlantic Ocean", "The Indian Ocean", "The Arctic Ocean"),
    ("What is the largest country in the world by area?", "Russia", "China", "Brazil", "India"),
    ("On which continent is Kenya?", "Africa", "Asia", "South America", "Europe"),
    ("In which country are the pyramids of Giza?", "Egypt", "Mexico", "Greece", "India"),
    ("In which city is the Eiffel Tower?", "Paris", "Rome", "London", "Berlin"),
    ("In which city is the Statue of Liberty?", "New York City", "Boston", "Washington, D.C.", "San Francisco"),
    ("In which city is the Colosseum?", "Rome", "Athens", "Paris", "Madrid"),
    ("Which country is famous for tulips and windmills?", "The Netherlands", "Egypt", "Brazil", "Japan"),
    ("In which country is the city of Rio de Janeiro?", "Brazil", "Argentina", "Mexico", "Spain"),
    ("What is the currency of Japan?", "The yen", "The dollar", "The euro", "The peso"),
    ("What is the currency of the United Kingdom?", "The pound sterling", "The euro", "The dollar", "The yen"),
    ("What language is mainly spoken in Mexico?", "Spanish", "Portuguese", "French", "English"),
    ("What language is mainly spoken in Germany?", "German", "Dutch", "French", "Polish"),
    ("What is the main ingredient of guacamole?", "Avocado", "Tomato", "Potato", "Banana"),
    ("Which bird is a common symbol of peace?", "The dove", "The eagle", "The crow", "The vulture"),
    ("Which animal gives most of the milk that people drink?", "The cow", "The horse", "The pig", "The chicken"),
    ("How many days does it take the Earth to go around the Sun?", "About 365", "About 30", "About 7", "About 1000"),
    ("What color are the leaves of most healthy trees in summer?", "Green", "Blue", "Purple", "White"),
    ("Which blood cells help the body fight infections?", "White blood cells", "Red blood cells", "Platelets", "Nerve cells"),
]

WORD_TASKS: list[Row] = [
    ("What is the opposite of 'hot'?", "cold", "warm", "spicy", "sunny"),
    ("What is the opposite of 'big'?", "small", "large", "huge", "tall"),
    ("What is the opposite of 'happy'?", "sad", "glad", "cheerful", "funny"),
    ("What is the opposite of 'fast'?", "slow", "quick", "rapid", "loud"),
    ("What is the opposite of 'open'?", "closed", "wide", "empty", "free"),
    ("What is the opposite of 'early'?", "late", "soon", "first", "quick"),
    ("What is the opposite of 'full'?", "empty", "heavy", "whole", "large"),
    ("What is the opposite of 'strong'?", "weak", "tough", "firm", "powerful"),
    ("What is the opposite of 'rich'?", "poor", "wealthy", "famous", "busy"),
    ("What is the opposite of 'young'?", "old", "small", "new", "fresh"),
    ("What is the opposite of 'loud'?", "quiet", "noisy", "high", "sharp"),
    ("What is the opposite of 'wet'?", "dry", "damp", "cold", "soft"),
    ("What is the opposite of 'up'?", "down", "over", "high", "top"),
    ("What is the opposite of 'day'?", "night", "morning", "noon", "week"),
    ("What is the opposite of 'push'?", "pull", "press", "throw", "kick"),
    ("What is the opposite of 'buy'?", "sell", "pay", "spend", "shop"),
    ("What is the opposite of 'before'?", "after", "during", "early", "since"),
    ("What is the opposite of 'win'?", "lose", "gain", "play", "score"),
    ("What is the opposite of 'thick'?", "thin", "wide", "heavy", "dense"),
    ("What is the opposite of 'friend'?", "enemy", "partner", "buddy", "neighbor"),
    ("Which word means the same as 'big'?", "large", "tiny", "short", "narrow"),
    ("Which word means the same as 'quick'?", "fast", "slow", "lazy", "late"),
    ("Which word means the same as 'begin'?", "start", "finish", "stop", "end"),
    ("Which word means the same as 'small'?", "little", "huge", "giant", "wide"),
    ("Which word means the same as 'shut'?", "close", "open", "break", "lift"),
    ("Which word means the same as 'difficult'?", "hard", "easy", "simple", "soft"),
    ("Which word means the same as 'gift'?", "present", "price", "debt", "bill"),
    ("Which word means the same as 'ill'?", "sick", "healthy", "strong", "fit"),
    ("Which word means the same as 'finish'?", "end", "begin", "open", "start"),
    ("Which word means the same as 'shout'?", "yell", "whisper", "sleep", "sing"),
    ("Which word means the same as 'correct'?", "right", "wrong", "false", "broken"),
    ("Which word means the same as 'glad'?", "happy", "angry", "tired", "bored"),
    ("What is the plural of 'mouse'?", "mice", "mouses", "mousen", "meese"),
    ("What is the plural of 'child'?", "children", "childs", "childes", "childer"),
    ("What is the plural of 'tooth'?", "teeth", "tooths", "toothes", "teeths"),
    ("What is the plural of 'foot'?", "feet", "foots", "footes", "feets"),
    ("What is the plural of 'woman'?", "women", "womans", "womanes", "womens"),
    ("What is the plural of 'goose'?", "geese", "gooses", "goosen", "geeses"),
    ("What is the plural of 'person'?", "people", "persones", "peoples", "personen"),
    ("What is the plural of 'leaf'?", "leaves", "leafs", "leafes", "leavs"),
    ("What is the plural of 'knife'?", "knives", "knifes", "knifs", "kniven"),
    ("What is the plural of 'box'?", "boxes", "boxs", "boxen", "bixes"),
    ("What is the plural of 'city'?", "cities", "citys", "cityes", "citis"),
    ("What is the past tense of 'run'?", "ran", "runned", "runs", "running"),
    ("What is the past tense of 'go'?", "went", "goed", "going", "goes"),
    ("What is the past tense of 'eat'?", "ate", "eated", "eats", "eating"),
    ("What is the past tense of 'see'?", "saw", "seed", "seeing", "sees"),
    ("What is the past tense of 'write'?", "wrote", "writed", "writes", "writing"),
    ("What is the past tense of 'swim'?", "swam", "swimmed", "swims", "swimming"),
    ("What is the past tense of 'buy'?", "bought", "buyed", "buys", "buying"),
    ("What is the past tense of 'think'?", "thought", "thinked", "thinks", "thinking"),
    ("What is the past tense of 'sing'?", "sang", "singed", "sings", "singing"),
    ("What is the past tense of 'take'?", "took", "taked", "takes", "taking"),
    ("What is the past tense of 'fly'?", "flew", "flied", "flies", "flying"),
    ("Which word rhymes with 'cat'?", "hat", "dog", "cup", "tree"),
    ("Which word rhymes with 'moon'?", "spoon", "sun", "star", "fork"),
    ("Which word rhymes with 'light'?", "night", "lamp", "dark", "sun"),
    ("Which word rhymes with 'cake'?", "lake", "bread", "cook", "cup"),
    ("Which word rhymes with 'ring'?", "sing", "rang", "rope", "bell"),
    ("Which word rhymes with 'bear'?", "chair", "bird", "wolf", "tree"),
    ("Which word rhymes with 'goat'?", "boat", "sheep", "cow", "gate"),
    ("Which word rhymes with 'fish'?", "dish", "fin", "sea", "fast"),
    ("Which word is spelled correctly?", "necessary", "neccessary", "necesary", "neccesary"),
    ("Which word is spelled correctly?", "separate", "seperate", "separet", "seperet"),
    ("Which word is spelled correctly?", "definitely", "definately", "definitly", "defenitely"),
    ("Which word is spelled correctly?", "receive", "recieve", "receve", "resieve"),
    ("Which word is spelled correctly?", "beautiful", "beautifull", "beutiful", "beatiful"),
    ("Which word is spelled correctly?", "tomorrow", "tommorow", "tomorow", "tommorrow"),
    ("Which word is a color?", "blue", "table", "run", "happy"),
    ("Which word is an animal?", "horse", "chair", "river", "spoon"),
    ("Which word is a verb?", "jump", "chair", "green", "slowly"),
    ("Which word is a fruit?", "apple", "carrot", "bread", "cheese"),
    ("Which word starts with the letter B?", "ball", "apple", "cat", "dog"),
    ("Which word starts with the letter S?", "sun", "moon", "tree", "car"),
    ("What is a baby dog called?", "a puppy", "a kitten", "a calf", "a foal"),
    ("What is a baby cat called?", "a kitten", "a puppy", "a lamb", "a cub"),
    ("What is a baby sheep called?", "a lamb", "a calf", "a kid", "a foal"),
    ("What is a baby cow called?", "a calf", "a lamb", "a puppy", "a chick"),
    ("What is the female form of 'king'?", "queen", "princess", "duchess", "lady"),
    ("What is the female form of 'prince'?", "princess", "queen", "duchess", "maid"),
    ("What is the comparative form of 'good'?", "better", "gooder", "best", "more good"),
    ("What is the superlative form of 'bad'?", "worst", "baddest", "worse", "most bad"),
    ("What do you call a person who teaches at a school?", "a teacher", "a doctor", "a farmer", "a pilot"),
    ("What do you call a person who flies an airplane?", "a pilot", "a sailor", "a driver", "a teacher"),
    ("Which word joins 'sun' and 'flower' into one word?", "sunflower", "flowersun", "sunsflower", "sunflour"),
    ("Complete the phrase: as busy as a ...", "bee", "stone", "cloud", "spoon"),
    ("Which word comes first in alphabetical order?", "apple", "banana", "cherry", "grape"),
    ("How many letters are in the word 'cat'?", "three", "two", "four", "five"),
]

SHORT_REASONING: list[Row] = [
    ("What number comes next: 2, 4, 6, 8, ...?", "2, 4, 6, 8, {}", "10", "9", "12", "16"),
    ("What number comes next: 5, 10, 15, 20, ...?", "5, 10, 15, 20, {}", "25", "30", "21", "40"),
    ("What number comes next: 1, 3, 5, 7, ...?", "1, 3, 5, 7, {}", "9", "8", "10", "11"),
    ("What number comes next: 10, 20, 30, 40, ...?", "10, 20, 30, 40, {}", "50", "45", "60", "41"),
    ("What number comes next: 3, 6, 9, 12, ...?", "3, 6, 9, 12, {}", "15", "13", "14", "18"),
    ("What number comes next: 1, 2, 4, 8, ...?", "1, 2, 4, 8, {}", "16", "10", "12", "9"),
    ("What number comes next: 100, 90, 80, 70, ...?", "100, 90, 80, 70, {}", "60", "50", "65", "69"),
    ("What number comes next: 1, 4, 9, 16, ...?", "1, 4, 9, 16, {}", "25", "20", "24", "32"),
    ("What number comes next: 20, 18, 16, 14, ...?", "20, 18, 16, 14, {}", "12", "10", "13", "15"),
    ("What letter comes next: A, B, C, D, ...?", "A, B, C, D, {}", "E", "F", "G", "A"),
    ("What letter comes next: A, C, E, G, ...?", "A, C, E, G, {}", "I", "H", "J", "K"),
    ("What comes next: Monday, Tuesday, Wednesday, ...?", "Monday, Tuesday, Wednesday, {}", "Thursday", "Friday", "Sunday", "Monday"),
    ("What comes next: spring, summer, autumn, ...?", "Spring, summer, autumn, {}", "winter", "spring", "summer", "monsoon"),
    ("If today is Monday, what day is tomorrow?", "Tomorrow is {}.", "Tuesday", "Sunday", "Wednesday", "Friday"),
    ("If today is Friday, what day was yesterday?", "Yesterday was {}.", "Thursday", "Saturday", "Wednesday", "Sunday"),
    ("If today is Saturday, what day will it be in two days?", "In two days it will be {}.", "Monday", "Sunday", "Tuesday", "Friday"),
    ("If today is Wednesday, what day was it two days ago?", "Two days ago it was {}.", "Monday", "Tuesday", "Friday", "Sunday"),
    ("If yesterday was Tuesday, what day is today?", "Today is {}.", "Wednesday", "Monday", "Thursday", "Tuesday"),
    ("A week has 7 days. If today is Sunday, what day will it be in 7 days?", "In 7 days it will be {}.", "Sunday", "Monday", "Saturday", "Tuesday"),
    ("Which month comes right after March?", "The month after March is {}.", "April", "February", "May", "June"),
    ("Which month comes right before June?", "The month before June is {}.", "May", "July", "April", "March"),
    ("Which month comes right after December?", "The month after December is {}.", "January", "November", "February", "October"),
    ("Anna is taller than Ben. Ben is taller than Carl. Who is the tallest?", "{} is the tallest.", "Anna", "Ben", "Carl"),
    ("Anna is taller than Ben. Ben is taller than Carl. Who is the shortest?", "{} is the shortest.", "Carl", "Anna", "Ben"),
    ("Maria is older than Lucy. Lucy is older than Sam. Who is the oldest?", "{} is the oldest.", "Maria", "Lucy", "Sam"),
    ("Maria is older than Lucy. Lucy is older than Sam. Who is the youngest?", "{} is the youngest.", "Sam", "Maria", "Lucy"),
    ("A car is faster than a bicycle, and a bicycle is faster than a person walking. Which is the slowest?", "The slowest is {}.",
     "the person walking", "the car", "the bicycle"),
    ("A rock is heavier than an apple, and an apple is heavier than a feather. Which is the lightest?", "The lightest is {}.",
     "the feather", "the rock", "the apple"),
    ("Tom has more books than Jack. Jack has more books than Paul. Who has the fewest books?", "{} has the fewest books.", "Paul", "Tom", "Jack"),
    ("Sam finished the race before Joe, and Joe finished before Ken. Who finished last?", "{} finished last.", "Ken", "Sam", "Joe"),
    ("Sam finished the race before Joe, and Joe finished before Ken. Who finished first?", "{} finished first.", "Sam", "Joe", "Ken"),
    ("Sara is older than Tim. Who is younger?", "{} is younger.", "Tim", "Sara"),
    ("Kate is shorter than Emma. Who is taller?", "{} is taller.", "Emma", "Kate"),
    ("The red box is bigger than the blue box. Which box is smaller?", "The {} box is smaller.", "blue", "red"),
    ("Ben is standing in front of Ann. Who is behind Ben?", "{} is behind Ben.", "Ann", "Nobody"),
    ("All birds have feathers. A robin is a bird. Does a robin have feathers?", "{}", "Yes, a robin has feathers.", "No, a robin has no feathers."),
    ("All dogs are animals. Rex is a dog. Is Rex an animal?", "{}", "Yes, Rex is an animal.", "No, Rex is not an animal."),
    ("No fish can walk. A salmon is a fish. Can a salmon walk?", "{}", "No, a salmon cannot walk.", "Yes, a salmon can walk."),
    ("Every student in the class passed the test. Mia is a student in the class. Did Mia pass the test?", "{}",
     "Yes, Mia passed the test.", "No, Mia failed the test."),
    ("If it rains, the street gets wet. It is raining. Is the street wet?", "{}", "Yes, the street is wet.", "No, the street is dry."),
    ("None of the cups are red. Is any cup red?", "{}", "No, no cup is red.", "Yes, one cup is red."),
    ("A ball is inside a box, and the box is inside a bag. Is the ball inside the bag?", "{}", "Yes, the ball is inside the bag.",
     "No, the ball is outside the bag."),
    ("If a number is even, it can be divided by 2. Is 10 an even number?", "{}", "Yes, 10 is even.", "No, 10 is not even."),
    ("A glass is empty. Is there any water in it?", "{}", "No, there is no water in it.", "Yes, it is full of water."),
    ("Is 9 an odd number or an even number?", "9 is an {} number.", "odd", "even"),
    ("All squares have four sides. This shape is a square. How many sides does it have?", "It has {} sides.", "four", "three", "five", "six"),
    ("Tom has 3 apples and gets 2 more. How many apples does he have now?", "He has {} apples now.", "5", "6", "4", "1"),
    ("Lisa had 10 candies and ate 4. How many candies does she have left?", "She has {} candies left.", "6", "14", "5", "4"),
    ("A farmer has 4 cows and 3 horses. How many animals does he have?", "He has {} animals.", "7", "12", "6", "1"),
    ("There are 5 birds on a tree and 2 fly away. How many birds are left?", "{} birds are left.", "3", "7", "2", "5"),
    ("How many wheels do two bicycles have in total?", "Two bicycles have {} wheels.", "4", "2", "6", "8"),
    ("A pizza is cut into 8 slices and you eat 3. How many slices are left?", "{} slices are left.", "5", "11", "4", "3"),
    ("Each box holds 2 balls. How many balls are in 3 boxes?", "There are {} balls in 3 boxes.", "6", "5", "8", "3"),
    ("If you have 2 hands with 5 fingers each, how many fingers do you have?", "You have {} fingers.", "10", "7", "12", "25"),
    ("A train leaves at 2 PM and arrives at 5 PM. How many hours does the trip take?", "The trip takes {} hours.", "3", "2", "5", "7"),
    ("If 4 friends share 8 cookies equally, how many cookies does each friend get?", "Each friend gets {} cookies.", "2", "4", "3", "12"),
    ("A dozen eggs is 12 eggs. How many eggs are in half a dozen?", "Half a dozen is {} eggs.", "6", "12", "4", "24"),
    ("There are 7 days in a week. How many days are in two weeks?", "Two weeks have {} days.", "14", "9", "21", "7"),
    ("Jane has 2 brothers and 1 sister. How many siblings does Jane have?", "Jane has {} siblings.", "3", "2", "1", "4"),
    ("A baker makes 5 loaves of bread each day. How many loaves does he make in 2 days?", "He makes {} loaves in 2 days.", "10", "7", "5", "25"),
    ("A movie starts at 3 PM and lasts two hours. When does it end?", "It ends at {}.", "5 PM", "4 PM", "1 PM", "6 PM"),
    ("You wake up at 7 AM and leave home one hour later. When do you leave?", "You leave at {}.", "8 AM", "6 AM", "9 AM", "7 PM"),
    ("You face north and then turn to face the opposite way. Which direction do you face now?", "You face {}.", "south", "north", "east", "west"),
    ("The sun rises in the east. In which direction does it set?", "It sets in the {}.", "west", "east", "north", "south"),
    ("Which one does not belong: apple, banana, carrot, grape?", "{} does not belong.", "Carrot", "Apple", "Banana", "Grape"),
    ("Which one does not belong: dog, cat, rose, horse?", "{} does not belong.", "Rose", "Dog", "Cat", "Horse"),
    ("Which one does not belong: red, blue, green, chair?", "{} does not belong.", "Chair", "Red", "Blue", "Green"),
    ("Which one does not belong: car, bus, train, banana?", "{} does not belong.", "Banana", "Car", "Bus", "Train"),
    ("Which one does not belong: Monday, Friday, July, Sunday?", "{} does not belong.", "July", "Monday", "Friday", "Sunday"),
    ("Which one does not belong: 2, 4, 7, 8?", "{} does not belong.", "7", "2", "4", "8"),
    ("Which is the odd number out: 3, 5, 9, 10?", "The odd one out is {}.", "10", "3", "5", "9"),
    ("If you drop a glass on a stone floor, what will most likely happen?", "{}", "It will break.", "It will bounce back up.", "It will float.",
     "It will melt."),
    ("If you put ice in a hot pan, what will happen to the ice?", "{}", "It will melt.", "It will grow.", "It will turn to stone.", "It will stay frozen."),
    ("It is raining outside. What should you take to stay dry?", "You should take {}.", "an umbrella", "sunglasses", "a fan", "a shovel"),
    ("You are thirsty. What should you do?", "You should {}.", "drink some water", "go to sleep", "read a book", "run a race"),
    ("A plant is left without water for many weeks. What will most likely happen?", "{}", "It will wilt and die.", "It will grow faster.",
     "It will turn blue.", "It will make fruit."),
    ("If all the lights in a room without windows are turned off at night, what is the room like?", "The room is {}.", "dark", "bright", "sunny",
     "colorful"),
    ("A cup is full of water. You pour all of it out. What is the cup now?", "The cup is now {}.", "empty", "full", "heavier", "bigger"),
    ("Which is heavier: one kilogram of iron or one kilogram of feathers?", "{}", "They weigh the same.", "The iron is heavier.",
     "The feathers are heavier."),
    ("Which number is the largest: 12, 45, 7, 30?", "The largest number is {}.", "45", "12", "7", "30"),
    ("Which number is the smallest: 18, 3, 25, 9?", "The smallest number is {}.", "3", "18", "25", "9"),
    ("Which is longer: one meter or one kilometer?", "{} is longer.", "One kilometer", "One meter"),
    ("Which is longer: a day or an hour?", "{} is longer.", "A day", "An hour"),
    ("Which is colder: ice or boiling water?", "{} is colder.", "Ice", "Boiling water"),
    ("A square and a triangle: which has more corners?", "{} has more corners.", "The square", "The triangle"),
    ("Lily is Tom's sister. What is Tom to Lily?", "Tom is Lily's {}.", "brother", "sister", "father", "uncle"),
    ("What is your mother's mother to you?", "She is my {}.", "grandmother", "aunt", "sister", "cousin"),
    ("If you mix red paint and white paint, what color do you get?", "You get {}.", "pink", "green", "black", "blue"),
    ("If you are in a room and walk out of it, are you inside or outside the room?", "You are {} the room.", "outside", "inside"),
]

# Reply frames for the hand-written lists' common question forms (a choice is the whole reply:
# "The opposite of hot is cold.", which a chat model says, rather than a bare "cold").
FRAMES = [
    (r"What is the capital of (.+)\?", "The capital of {0} is {{}}."),
    (r"What is the opposite of '(.+)'\?", "The opposite of {0} is {{}}."),
    (r"Which word means the same as '(.+)'\?", "A word that means the same as {0} is {{}}."),
    (r"What is the plural of '(.+)'\?", "The plural of {0} is {{}}."),
    (r"What is the past tense of '(.+)'\?", "The past tense of {0} is {{}}."),
    (r"Which word rhymes with '(.+)'\?", "{0} rhymes with {{}}."),
    (r"What is a baby (.+) called\?", "A baby {0} is called {{}}."),
    (r"What is the (female|comparative|superlative) form of '(.+)'\?", "The {0} form of {1} is {{}}."),
    (r"What do you call a person who (.+)\?", "A person who {0} is called {{}}."),
]


def framed(row: Row) -> tuple[str, list[str]]:
    """The question and its choices (the correct one first): a row's own frame (its second field,
    holding ``{}``), else the first matching :data:`FRAMES` entry, else the bare answers."""
    question, *rest = row
    if "{}" in rest[0]:
        frame, answers = rest[0], rest[1:]
    else:
        frame, answers = "{}", rest
        for pattern, template in FRAMES:
            if m := re.fullmatch(pattern, question):
                frame = template.format(*m.groups())
                break
    return question, [(c := frame.format(a))[0].upper() + c[1:] for a in answers]


# ----------------------------------------------------------------------------- generated categories


def _near(rng: random.Random, answer: int, avoid: set[int]) -> list[str]:
    """Three distractors close to ``answer``: positive, not an operand (a model that echoes the
    question would pick it), and no number written as the start of another ("1" vs "12")."""
    pool = [answer + d for d in (-10, -2, -1, 1, 2, 10) if answer + d > 0 and answer + d not in avoid]
    pool = [x for x in pool if not (str(x).startswith(str(answer)) or str(answer).startswith(str(x)))]
    picked: list[int] = []
    for x in rng.sample(pool, len(pool)):
        if len(picked) < 3 and not any(str(x).startswith(str(y)) or str(y).startswith(str(x)) for y in picked):
            picked.append(x)
    return [str(x) for x in picked]


def arithmetic(rng: random.Random, n: int = 90) -> list[Row]:
    """Small sums, differences, products and quotients, answered as the equation ("4 + 3 = 7")."""
    rows: list[Row] = []
    seen: set[str] = set()
    kinds = ["add", "sub", "mul", "div", "add2"]
    while len(rows) < n:
        kind = kinds[len(rows) % len(kinds)]
        if kind == "add":
            a, b = rng.randint(2, 9), rng.randint(2, 9)
            q, f, ans = f"What is {a} + {b}?", f"{a} + {b} = {{}}", a + b
        elif kind == "add2":
            a, b = rng.randint(10, 49), rng.randint(10, 49)
            q, f, ans = f"What is {a} + {b}?", f"{a} + {b} = {{}}", a + b
        elif kind == "sub":
            a, b = rng.randint(10, 30), rng.randint(2, 9)
            q, f, ans = f"What is {a} - {b}?", f"{a} - {b} = {{}}", a - b
        elif kind == "mul":
            a, b = rng.randint(2, 9), rng.randint(2, 9)
            q, f, ans = f"What is {a} times {b}?", f"{a} × {b} = {{}}", a * b
        else:
            b, ans = rng.randint(2, 9), rng.randint(2, 9)
            a = b * ans
            q, f = f"What is {a} divided by {b}?", f"{a} ÷ {b} = {{}}"
        if q in seen or {a, b} == {3, 5}:  # 3 + 5 is in the training sample
            continue
        seen.add(q)
        rows.append((q, f, str(ans), *_near(rng, ans, {a, b})))
    return rows


# (unit, its plural, smaller unit, how many of the smaller in one); minutes per hour is taught in training: left out
UNIT_FACTS = [
    ("meter", "meters", "centimeters", 100), ("kilometer", "kilometers", "meters", 1000), ("kilogram", "kilograms", "grams", 1000),
    ("liter", "liters", "milliliters", 1000), ("minute", "minutes", "seconds", 60), ("day", "days", "hours", 24), ("week", "weeks", "days", 7),
    ("year", "years", "months", 12), ("foot", "feet", "inches", 12), ("yard", "yards", "feet", 3), ("centimeter", "centimeters", "millimeters", 10),
    ("meter", "meters", "millimeters", 1000), ("century", "centuries", "years", 100), ("decade", "decades", "years", 10),
    ("millennium", "millennia", "years", 1000), ("pound", "pounds", "ounces", 16), ("byte", "bytes", "bits", 8),
]
WRONG_FACTOR = {60: 100, 100: 60, 1000: 100, 12: 10, 10: 100, 24: 12, 7: 5, 3: 12, 16: 12, 8: 10}

UNIT_ROWS: list[Row] = [
    ("Which is longer: one meter or one centimeter?", "{} is longer.", "One meter", "One centimeter"),
    ("Which is longer: one mile or one inch?", "{} is longer.", "One mile", "One inch"),
    ("Which is longer: one week or one day?", "{} is longer.", "One week", "One day"),
    ("Which is longer: one year or one month?", "{} is longer.", "One year", "One month"),
    ("Which is longer: one minute or one second?", "{} is longer.", "One minute", "One second"),
    ("Which is longer: one decade or one century?", "{} is longer.", "One century", "One decade"),
    ("Which is longer: one foot or one yard?", "{} is longer.", "One yard", "One foot"),
    ("Which is heavier: one kilogram or one gram?", "{} is heavier.", "One kilogram", "One gram"),
    ("Which is heavier: one ton or one kilogram?", "{} is heavier.", "One ton", "One kilogram"),
    ("Which holds more: one liter or one milliliter?", "{} holds more.", "One liter", "One milliliter"),
    ("Which is shorter: one millimeter or one meter?", "{} is shorter.", "One millimeter", "One meter"),
    ("Which is shorter: one second or one hour?", "{} is shorter.", "One second", "One hour"),
    ("Which is lighter: one gram or one kilogram?", "{} is lighter.", "One gram", "One kilogram"),
    ("Which is bigger: one kilobyte or one byte?", "{} is bigger.", "One kilobyte", "One byte"),
    ("What unit is commonly used to measure temperature?", "Temperature is measured in {}.", "degrees Celsius", "kilograms", "meters", "liters"),
    ("What unit is commonly used to measure the weight of a person?", "A person's weight is measured in {}.", "kilograms", "liters", "degrees",
     "seconds"),
    ("What unit is commonly used to measure the volume of milk?", "The volume of milk is measured in {}.", "liters", "meters", "kilograms", "degrees"),
    ("What unit is commonly used to measure the distance between two cities?", "The distance between cities is measured in {}.", "kilometers",
     "grams", "liters", "seconds"),
    ("What unit is commonly used to measure electric current?", "Electric current is measured in {}.", "amperes", "kilograms", "meters", "liters"),
    ("What is the symbol for kilogram?", "The symbol for kilogram is {}.", "kg", "km", "kl", "kgm"),
    ("What is the symbol for centimeter?", "The symbol for centimeter is {}.", "cm", "ct", "cr", "c"),
    ("What is the symbol for milliliter?", "The symbol for milliliter is {}.", "mL", "mg", "mm", "ms"),
    ("What does the 'kilo' in kilometer mean?", "Kilo means {}.", "one thousand", "one hundred", "one tenth", "one million"),
    ("What does the 'centi' in centimeter mean?", "Centi means {}.", "one hundredth", "one thousand", "one tenth", "one hundred"),
    ("Water freezes at what temperature in degrees Celsius?", "Water freezes at {} degrees Celsius.", "0", "100", "32", "-50"),
    ("Normal human body temperature is about how many degrees Celsius?", "It is about {} degrees Celsius.", "37", "100", "10", "60"),
    ("How many sides does a square have?", "A square has {} sides.", "4", "3", "5", "6"),
    ("How many sides does a triangle have?", "A triangle has {} sides.", "3", "4", "5", "2"),
    ("How many degrees are in a right angle?", "A right angle has {} degrees.", "90", "180", "45", "360"),
    ("How many degrees are in a full circle?", "A full circle has {} degrees.", "360", "180", "90", "100"),
    ("How many hours are in half a day?", "Half a day is {} hours.", "12", "24", "6", "30"),
    ("How many months are in half a year?", "Half a year is {} months.", "6", "12", "4", "3"),
    ("How many centimeters are in half a meter?", "Half a meter is {} centimeters.", "50", "5", "500", "100"),
    ("How many grams are in half a kilogram?", "Half a kilogram is {} grams.", "500", "50", "5000", "250"),
    ("How many seconds are in two minutes?", "Two minutes is {} seconds.", "120", "60", "200", "100"),
    ("How many items are in a dozen?", "A dozen is {} items.", "12", "10", "20", "6"),
]


def units(rng: random.Random, n: int = 90) -> list[Row]:
    """Unit facts ("1 kilogram = 1000 grams"), small multiples ("3 kilograms = 3000 grams") and the
    hand-written :data:`UNIT_ROWS` (which is longer, what measures what, symbols)."""
    rows: list[Row] = []
    for big, _bigs, small, k in UNIT_FACTS:
        wrong = sorted({k * 10, max(k // 10, 2), WRONG_FACTOR.get(k, k + 2)} - {k})
        rows.append((f"How many {small} are in one {big}?", f"1 {big} = {{}} {small}", str(k), *[str(w) for w in wrong]))
    for big, bigs, small, k in UNIT_FACTS:
        if big == "millennium":
            continue
        for m in rng.sample([2, 3, 4, 5], 2):
            wrong = sorted({k * m * 10, k + m, k * (m + 1), k * (m - 1) if m > 2 else k * m + k * 2} - {k * m})
            rows.append((f"How many {small} are in {m} {bigs}?", f"{m} {bigs} = {{}} {small}", str(k * m), *[str(w) for w in wrong[:3]]))
    rows += UNIT_ROWS
    rng.shuffle(rows)
    return rows[:n]


# ----------------------------------------------------------------------------- writing


def items() -> list[dict[str, object]]:
    rng = random.Random(25)
    banks = {"arithmetic": arithmetic(random.Random(1)), "units": units(random.Random(2)), "world_facts": WORLD_FACTS,
             "word_tasks": WORD_TASKS, "short_reasoning": SHORT_REASONING}
    out: list[dict[str, object]] = []
    for category, rows in banks.items():
        order = list(range(len(rows)))
        rng.shuffle(order)
        dev = {order[i] for i in range(0, len(order), 4)}
        for n, row in enumerate(rows):
            question, (correct, *wrong) = framed(row)
            choices = list(wrong)
            rng.shuffle(choices)
            answer = n % (len(choices) + 1)
            choices.insert(answer, correct)
            out.append({"id": f"{category}-{n + 1:03d}", "category": category, "question": question, "choices": choices,
                        "answer": answer, "split": "dev" if n in dev else "test"})
    return out


def main() -> None:
    path = Path(__file__).with_name("general.jsonl")
    path.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items()), encoding="utf-8")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
