"""Write ``sharegpt_sample.json``: llama-pipe's own sample of raw ShareGPT (2023 ChatGPT export) data.

Everything here was written for llama-pipe. The output is deterministic (fixed seed, fixed order)::

    python data/sample/make_sample.py            # writes data/sample/sharegpt_sample.json

The records mimic what a 2023 ShareGPT scrape looks like: human turns as plain text, gpt turns
as the rendered ChatGPT HTML (``<div class="markdown prose ...">``), code blocks with the
"Copy code" header, lists, tables, links, HTML entities, "1 / 2" regenerate counters, several
languages, a few long conversations, and a handful of deliberately broken records (see
``data/sample/README.md``).
"""

from __future__ import annotations

import html
import json
import random
from pathlib import Path
from typing import Any

OUT = Path(__file__).with_name("sharegpt_sample.json")
IDENTITY_OUT = Path(__file__).with_name("identity_sample.json")
SEED = 20230412

DIV_OPEN = '<div class="markdown prose w-full break-words dark:prose-invert light">'
DIV_OPEN_DARK = '<div class="markdown prose w-full break-words dark:prose-invert dark">'
COPY_SVG = (
    '<svg stroke="currentColor" fill="none" stroke-width="2" viewBox="0 0 24 24" '
    'stroke-linecap="round" stroke-linejoin="round" class="h-4 w-4" height="1em" width="1em" '
    'xmlns="http://www.w3.org/2000/svg"><path d="M16 4h2a2 2 0 0 1 2 2v14a2 2 0 0 1-2 2H6a2 2 0 '
    '0 1-2-2V6a2 2 0 0 1 2-2h2"></path><rect x="8" y="2" width="8" height="4" rx="1" ry="1"></rect></svg>'
)

# ------------------------------------------------------------------ code snippets (language, code)
CODE: list[tuple[str, str]] = [
    ("python", 'def fibonacci(n: int) -> list[int]:\n    """Return the first n Fibonacci numbers."""\n    seq = [0, 1]\n    while len(seq) < n:\n        seq.append(seq[-1] + seq[-2])\n    return seq[:n]\n\nprint(fibonacci(10))  # [0, 1, 1, 2, 3, 5, 8, 13, 21, 34]\n'),
    ("python", "import csv\nfrom collections import defaultdict\n\ntotals = defaultdict(float)\nwith open('sales.csv', newline='') as f:\n    for row in csv.DictReader(f):\n        if row['region'] and float(row['amount']) > 0:\n            totals[row['region']] += float(row['amount'])\n\nfor region, amount in sorted(totals.items(), key=lambda kv: -kv[1]):\n    print(f\"{region:<12} {amount:>10.2f}\")\n"),
    ("python", "import asyncio\nimport aiohttp\n\nasync def fetch(session, url):\n    async with session.get(url, timeout=10) as resp:\n        return url, resp.status\n\nasync def main(urls):\n    async with aiohttp.ClientSession() as session:\n        results = await asyncio.gather(*(fetch(session, u) for u in urls))\n    for url, status in results:\n        print(status, url)\n\nasyncio.run(main(['https://example.com', 'https://example.org']))\n"),
    ("python", "class LRUCache:\n    def __init__(self, capacity):\n        self.capacity = capacity\n        self.data = {}\n\n    def get(self, key):\n        if key not in self.data:\n            return -1\n        value = self.data.pop(key)\n        self.data[key] = value  # move to the end\n        return value\n\n    def put(self, key, value):\n        self.data.pop(key, None)\n        self.data[key] = value\n        if len(self.data) > self.capacity:\n            del self.data[next(iter(self.data))]\n"),
    ("python", "import pandas as pd\n\ndf = pd.read_csv('weather.csv', parse_dates=['date'])\nmonthly = (df.set_index('date')\n             .resample('M')['temp_c']\n             .agg(['mean', 'min', 'max'])\n             .round(1))\nprint(monthly.tail(3))\n"),
    ("javascript", "function debounce(fn, wait = 300) {\n  let timer = null;\n  return function (...args) {\n    clearTimeout(timer);\n    timer = setTimeout(() => fn.apply(this, args), wait);\n  };\n}\n\nconst onResize = debounce(() => console.log(window.innerWidth), 200);\nwindow.addEventListener('resize', onResize);\n"),
    ("javascript", "const express = require('express');\nconst app = express();\napp.use(express.json());\n\nconst todos = [];\napp.get('/todos', (req, res) => res.json(todos));\napp.post('/todos', (req, res) => {\n  if (!req.body.title) return res.status(400).json({ error: 'title is required' });\n  const todo = { id: todos.length + 1, title: req.body.title, done: false };\n  todos.push(todo);\n  res.status(201).json(todo);\n});\n\napp.listen(3000, () => console.log('listening on :3000'));\n"),
    ("typescript", "interface User {\n  id: number;\n  name: string;\n  email?: string;\n}\n\nfunction groupBy<T, K extends keyof any>(items: T[], key: (item: T) => K): Record<K, T[]> {\n  return items.reduce((acc, item) => {\n    (acc[key(item)] ||= []).push(item);\n    return acc;\n  }, {} as Record<K, T[]>);\n}\n\nconst users: User[] = [{ id: 1, name: 'Ana' }, { id: 2, name: 'Bo', email: 'bo@example.com' }];\nconsole.log(groupBy(users, u => (u.email ? 'with' : 'without')));\n"),
    ("bash", "#!/usr/bin/env bash\nset -euo pipefail\n\n# back up every .conf file modified in the last 7 days\nstamp=$(date +%Y%m%d)\nfind /etc -name '*.conf' -mtime -7 -print0 |\n  tar --null -czf \"/var/backups/conf-$stamp.tar.gz\" --files-from=-\necho \"wrote /var/backups/conf-$stamp.tar.gz\"\n"),
    ("sql", "SELECT c.name,\n       COUNT(o.id)        AS orders,\n       SUM(o.total_cents) / 100.0 AS revenue\nFROM customers c\nLEFT JOIN orders o ON o.customer_id = c.id\n                  AND o.created_at >= DATE '2023-01-01'\nGROUP BY c.name\nHAVING COUNT(o.id) > 0\nORDER BY revenue DESC\nLIMIT 10;\n"),
    ("rust", "use std::collections::HashMap;\n\nfn word_count(text: &str) -> HashMap<String, usize> {\n    let mut counts = HashMap::new();\n    for word in text.split_whitespace() {\n        let w = word.trim_matches(|c: char| !c.is_alphanumeric()).to_lowercase();\n        if !w.is_empty() {\n            *counts.entry(w).or_insert(0) += 1;\n        }\n    }\n    counts\n}\n\nfn main() {\n    let c = word_count(\"the cat and the hat\");\n    println!(\"{:?}\", c.get(\"the\"));\n}\n"),
    ("go", "package main\n\nimport (\n\t\"fmt\"\n\t\"sync\"\n)\n\nfunc main() {\n\tvar wg sync.WaitGroup\n\tresults := make([]int, 5)\n\tfor i := 0; i < 5; i++ {\n\t\twg.Add(1)\n\t\tgo func(i int) {\n\t\t\tdefer wg.Done()\n\t\t\tresults[i] = i * i\n\t\t}(i)\n\t}\n\twg.Wait()\n\tfmt.Println(results)\n}\n"),
    ("java", "import java.util.*;\n\npublic class Anagrams {\n    public static Map<String, List<String>> group(List<String> words) {\n        Map<String, List<String>> out = new TreeMap<>();\n        for (String w : words) {\n            char[] cs = w.toCharArray();\n            Arrays.sort(cs);\n            out.computeIfAbsent(new String(cs), k -> new ArrayList<>()).add(w);\n        }\n        return out;\n    }\n\n    public static void main(String[] args) {\n        System.out.println(group(List.of(\"eat\", \"tea\", \"tan\", \"ate\", \"nat\")));\n    }\n}\n"),
    ("cpp", "#include <iostream>\n#include <vector>\n#include <algorithm>\n\nint main() {\n    std::vector<int> v{5, 3, 9, 1, 7};\n    std::sort(v.begin(), v.end(), [](int a, int b) { return a > b; });\n    for (auto x : v) std::cout << x << ' ';\n    std::cout << \"\\n\";\n    return v.size() > 3 && v[0] == 9 ? 0 : 1;\n}\n"),
    ("html", '<!DOCTYPE html>\n<html lang="en">\n<head>\n  <meta charset="utf-8">\n  <title>Card</title>\n  <style>.card { border: 1px solid #ddd; padding: 1rem; border-radius: 8px; }</style>\n</head>\n<body>\n  <div class="card">\n    <h2>Hello &amp; welcome</h2>\n    <p>Prices start at <b>&lt;$10</b>.</p>\n  </div>\n</body>\n</html>\n'),
    ("css", ".grid {\n  display: grid;\n  grid-template-columns: repeat(auto-fill, minmax(200px, 1fr));\n  gap: 1rem;\n}\n\n.grid > * {\n  background: #f6f6f6;\n  border-radius: 6px;\n}\n\n@media (max-width: 600px) {\n  .grid { grid-template-columns: 1fr; }\n}\n"),
    ("yaml", "name: ci\non: [push, pull_request]\njobs:\n  test:\n    runs-on: ubuntu-latest\n    strategy:\n      matrix:\n        python: ['3.10', '3.11']\n    steps:\n      - uses: actions/checkout@v3\n      - uses: actions/setup-python@v4\n        with:\n          python-version: ${{ matrix.python }}\n      - run: pip install -e .[test] && pytest -q\n"),
    ("dockerfile", "FROM python:3.11-slim\nWORKDIR /app\nCOPY requirements.txt .\nRUN pip install --no-cache-dir -r requirements.txt\nCOPY . .\nENV PORT=8000\nEXPOSE 8000\nCMD [\"gunicorn\", \"-b\", \"0.0.0.0:8000\", \"app:app\"]\n"),
    ("r", "library(ggplot2)\n\ndf <- data.frame(x = rnorm(200), g = sample(c('a', 'b'), 200, TRUE))\nggplot(df, aes(x, fill = g)) +\n  geom_density(alpha = 0.4) +\n  theme_minimal() +\n  labs(title = 'Two groups', x = 'value')\n"),
    ("python", "import torch\nimport torch.nn as nn\n\nclass MLP(nn.Module):\n    def __init__(self, d_in, d_hidden, d_out):\n        super().__init__()\n        self.net = nn.Sequential(nn.Linear(d_in, d_hidden), nn.ReLU(), nn.Linear(d_hidden, d_out))\n\n    def forward(self, x):\n        return self.net(x)\n\nmodel = MLP(16, 64, 2)\nx = torch.randn(8, 16)\nprint(model(x).shape)  # torch.Size([8, 2])\n"),
    ("python", "from dataclasses import dataclass, field\n\n@dataclass(order=True)\nclass Task:\n    priority: int\n    name: str = field(compare=False)\n    tags: list[str] = field(default_factory=list, compare=False)\n\ntasks = sorted([Task(3, 'write docs'), Task(1, 'fix bug', ['urgent']), Task(2, 'review')])\nfor t in tasks:\n    print(t.priority, t.name, t.tags)\n"),
    ("", "$ git log --oneline -3\n3f2a1c9 fix: handle empty input\n9b7e0d2 feat: add --verbose flag\n1a2b3c4 initial commit\n"),
    ("json", '{\n  "name": "demo",\n  "version": "1.0.0",\n  "scripts": {\n    "build": "tsc -p .",\n    "test": "vitest run"\n  },\n  "dependencies": {\n    "zod": "^3.21.4"\n  }\n}\n'),
    ("kotlin", "data class Point(val x: Int, val y: Int)\n\nfun manhattan(a: Point, b: Point) = kotlin.math.abs(a.x - b.x) + kotlin.math.abs(a.y - b.y)\n\nfun main() {\n    val pts = listOf(Point(0, 0), Point(3, 4), Point(-1, 2))\n    println(pts.zipWithNext { a, b -> manhattan(a, b) })\n}\n"),
]

# ------------------------------------------------------------------ English prose, by topic
TOPICS: dict[str, dict[str, list[str]]] = {
    "cooking": {
        "q": ["What is a good weeknight dinner I can make in 30 minutes?", "How do I keep rice from getting mushy?", "Can you give me a vegetarian lasagna recipe?", "Why does my bread come out dense?", "How long should I rest a steak after cooking it?"],
        "s": ["Start by heating the pan properly; a cold pan makes food stick and steam instead of brown.", "Rinsing the rice until the water runs clear removes surface starch, which is what makes it gummy.", "A ratio of about 1 part rice to 1.25 parts water works well for most long-grain varieties.", "Dense bread usually means the dough was under-proofed or the flour had too little protein.", "Let the dough rise until it has roughly doubled and springs back slowly when you poke it.", "Resting meat for five to ten minutes lets the juices redistribute instead of running onto the board.", "Roasted vegetables such as zucchini, peppers and eggplant make a hearty filling for lasagna.", "Season in layers: a little salt at each stage tastes better than a lot at the end.", "A splash of acid, like lemon juice or vinegar, brightens a dish that tastes flat.", "Chickpeas, spinach and canned tomatoes turn into a quick curry in about twenty minutes."],
    },
    "travel": {
        "q": ["I have three days in Lisbon. What should I see?", "What should I pack for a week of hiking in the Alps?", "Is it better to buy a rail pass for Japan or single tickets?", "How can I avoid jet lag on a flight to Sydney?", "Plan a weekend trip to Kyoto for me."],
        "s": ["The Alfama district is best explored on foot early in the morning before the crowds arrive.", "Tram 28 is scenic but packed; walking the same route is often faster.", "Layering is the key for mountain weather: a base layer, a warm fleece and a waterproof shell.", "Broken-in boots matter more than any other piece of gear on a long hike.", "A rail pass pays off only if you take at least two long-distance trips within its validity.", "Shift your sleep by an hour a day during the week before departure.", "Get daylight in the morning after you land; it resets your body clock faster than anything else.", "Fushimi Inari is quietest at sunrise, and the upper trails are almost empty.", "Book popular restaurants a few weeks ahead, especially on weekends.", "Carry some cash, since small shops and temples often do not take cards."],
    },
    "fitness": {
        "q": ["Make me a beginner running plan for a 5K.", "How many times a week should I lift weights?", "What is a good stretching routine after sitting all day?", "Is it okay to work out when I'm sore?", "How do I start doing pull-ups if I can't do one?"],
        "s": ["Alternate one minute of running with two minutes of walking for the first week.", "Increase your weekly distance by no more than about ten percent.", "Three full-body sessions a week give beginners steady progress with enough recovery.", "Hip flexor stretches and thoracic rotations undo much of the stiffness from sitting.", "Mild soreness is fine; sharp pain or swelling is a signal to rest.", "Negative pull-ups, where you jump up and lower yourself slowly, build the strength you need.", "Sleep and protein intake affect recovery as much as the training plan itself.", "Track your sessions so you can see progress over weeks rather than days."],
    },
    "programming": {
        "q": ["What is the difference between a process and a thread?", "How do I write a function that debounces calls?", "Explain Big-O notation with an example.", "How do I read a CSV file and sum a column by group?", "What does async/await actually do?", "How would you implement an LRU cache?", "Write a SQL query for the top 10 customers by revenue this year.", "How can I make a responsive grid layout in CSS?"],
        "s": ["A process has its own memory space, while threads inside one process share memory.", "Because threads share memory, they need locks or other synchronisation to avoid races.", "Big-O describes how running time grows as the input grows, ignoring constant factors.", "A nested loop over the same list is O(n^2): doubling the input quadruples the work.", "Debouncing waits until calls stop arriving for a short time before running the function once.", "Async code lets one thread start many slow operations and handle each result as it arrives.", "An LRU cache evicts the entry that was used least recently when it runs out of room.", "In Python, a dict keeps insertion order, which makes a compact LRU cache possible.", "Always parse numbers explicitly instead of relying on string comparison.", "A LEFT JOIN keeps customers who have no orders, so filter on the order date inside the join condition.", "CSS grid with auto-fill and minmax adapts the number of columns to the screen width.", "Write a small test first; it tells you when the refactor is done.", "Prefer clear names over comments that explain unclear names.", "Measure before optimising: the slow part is rarely where you expect."],
    },
    "history": {
        "q": ["Why did the Roman Empire split into east and west?", "What caused the First World War?", "Summarise the history of the printing press.", "Who was Ada Lovelace?", "What was the Silk Road?"],
        "s": ["Administering a very large empire from a single capital had become impractical by the third century.", "Diocletian divided the administration among several emperors to manage frontier threats.", "The assassination in Sarajevo in 1914 triggered a war whose causes ran much deeper.", "Alliance systems, nationalism and an arms race turned a regional crisis into a continental war.", "Gutenberg's movable type, around 1450, made books far cheaper to produce.", "Printed pamphlets spread the ideas of the Reformation at a speed no manuscript could match.", "Ada Lovelace wrote what is often called the first published algorithm for a machine.", "Her notes on Babbage's Analytical Engine imagined machines working with symbols, not just numbers.", "The Silk Road was a network of routes rather than one road, linking China with the Mediterranean.", "Ideas, religions and diseases travelled along these routes as well as silk and spices."],
    },
    "science": {
        "q": ["Why is the sky blue?", "How do vaccines train the immune system?", "Explain photosynthesis simply.", "What is entropy?", "How do black holes form?", "Why do we have seasons?"],
        "s": ["Sunlight scatters off molecules in the air, and shorter blue wavelengths scatter the most.", "At sunset light travels through more air, so more of the blue is scattered away and reds remain.", "A vaccine shows the immune system a harmless piece or copy of a pathogen.", "Memory cells remember that shape and respond quickly if the real pathogen appears.", "Plants use light energy to turn carbon dioxide and water into sugar, releasing oxygen.", "Entropy measures how many microscopic arrangements are consistent with what we observe.", "A massive star that runs out of fuel can collapse under its own gravity into a black hole.", "Seasons come from the tilt of Earth's axis, not from changes in its distance to the Sun.", "Scientific models are judged by how well they predict new observations.", "Units matter: many calculation errors come from mixing metres and kilometres."],
    },
    "writing": {
        "q": ["Write a short poem about autumn.", "Help me write a cover letter for a data analyst job.", "Can you make this email sound more polite?", "Give me ideas for a short story about a lighthouse keeper.", "Write a product description for a reusable water bottle."],
        "s": ["Golden leaves drift down and settle on the quiet path.", "The air smells of woodsmoke and rain, and the evenings come early.", "Open with the role you are applying for and one concrete result you achieved.", "Mention the tools you used, such as SQL and Python, in the context of a real project.", "Replacing 'you need to' with 'could you' makes a request sound far less demanding.", "A keeper finds a message in a bottle that is dated forty years in the future.", "The light fails on the one night a ship carrying her estranged brother is due.", "Keeps drinks cold for twenty-four hours and hot for twelve.", "Made from stainless steel with a leak-proof lid that fits in any cup holder.", "End with a clear next step so the reader knows what to do."],
    },
    "finance": {
        "q": ["How should I start budgeting?", "What is the difference between a Roth IRA and a traditional IRA?", "Explain compound interest.", "Should I pay off debt or invest first?", "What is an index fund?"],
        "s": ["Write down every expense for a month before you try to set limits.", "The 50/30/20 rule splits income into needs, wants and savings.", "Compound interest means you earn interest on your interest as well as on the principal.", "High-interest debt, like credit cards, usually beats any investment return you can expect.", "An index fund holds every stock in an index, so its costs are low and its returns match the market.", "An emergency fund of three to six months of expenses protects you from selling investments at a bad time.", "This is general information, not financial advice; a licensed advisor can look at your situation.", "Automating savings on payday makes the habit stick."],
    },
}

TRANSITIONS = ["Here is how I would approach it.", "Sure! Here's a quick overview.", "Good question.", "Great question! Let me break it down.", "Certainly.", "Of course, here are the key points.", "There are a few things to consider."]
CLOSERS = ["Let me know if you'd like more detail on any of these.", "I hope this helps!", "Feel free to ask if something is unclear.", "Would you like me to go deeper on one of these points?", "Happy to adjust this if your situation is different."]
FOLLOWUPS = ["Can you explain that in more detail?", "Thanks! Can you give me an example?", "What would you do differently for a beginner?", "Could you make it shorter?", "Can you put that in a table?", "Why is that?", "continue", "That's helpful. What are common mistakes?", "Can you rewrite it more formally?", "ok, and what about the second point?"]

# ------------------------------------------------------------------ other languages
ZH = {
    "q": ["如何提高学习效率？", "请帮我写一首关于春天的诗。", "Python 中的列表和元组有什么区别？", "怎样做一道简单的番茄炒蛋？", "介绍一下长城的历史。", "我想学习机器学习，应该从哪里开始？", "请解释一下什么是区块链。", "怎么写一封求职信？", "北京有哪些值得去的地方？", "如何保持良好的睡眠习惯？"],
    "s": ["首先要制定明确的学习目标，把大任务拆分成小步骤。", "番茄工作法可以帮助你保持专注：学习二十五分钟，休息五分钟。", "列表是可变的，而元组一旦创建就不能修改。", "因为元组不可变，所以它可以作为字典的键。", "先把鸡蛋炒到半熟盛出，再炒番茄，最后把鸡蛋放回锅里一起翻炒。", "加一点糖可以中和番茄的酸味，让味道更加柔和。", "长城最早修建于春秋战国时期，秦始皇统一中国后把各段城墙连接起来。", "现在我们看到的大部分长城是明朝修建的。", "学习机器学习之前，最好先掌握线性代数、概率论和 Python 编程。", "可以从经典的线性回归和逻辑回归开始，再逐步学习神经网络。", "区块链是一种分布式账本，每个区块都记录了前一个区块的哈希值。", "求职信的开头要说明你申请的职位，以及你为什么适合这个职位。", "故宫、天坛和颐和园都是北京非常值得参观的地方。", "每天固定时间睡觉和起床，有助于调整生物钟。", "睡前一小时尽量不要看手机，蓝光会影响睡眠质量。", "春风拂过柳梢头，细雨轻敲小窗楼。", "桃花笑映溪边水，燕子归来绕旧楼。", "如果还有其他问题，欢迎随时问我。"],
}
OTHER = {
    "de": {"q": ["Wie kann ich meine Deutschkenntnisse verbessern?", "Was ist der Unterschied zwischen einer GmbH und einer AG?", "Erkläre mir bitte die Photosynthese.", "Schreib mir ein Rezept für Apfelstrudel."], "s": ["Am besten liest du jeden Tag einen kurzen Artikel und schreibst unbekannte Wörter auf.", "Eine GmbH braucht ein Stammkapital von 25.000 Euro, eine AG dagegen 50.000 Euro.", "Pflanzen nutzen das Sonnenlicht, um aus Wasser und Kohlendioxid Zucker herzustellen.", "Für den Teig brauchst du Mehl, Wasser, etwas Öl und eine Prise Salz.", "Die Äpfel werden geschält, in dünne Scheiben geschnitten und mit Zimt und Zucker vermischt.", "Gespräche mit Muttersprachlern helfen mehr als jedes Lehrbuch.", "Ich hoffe, das hilft dir weiter!"]},
    "fr": {"q": ["Comment préparer une bonne quiche lorraine ?", "Quelle est la différence entre « tu » et « vous » ?", "Peux-tu m'expliquer la Révolution française ?", "Comment apprendre à programmer en Python ?"], "s": ["Pour la pâte brisée, il faut de la farine, du beurre froid, un peu d'eau et du sel.", "Mélangez les œufs, la crème et les lardons, puis versez le tout sur la pâte.", "On utilise « vous » avec les inconnus et dans un contexte professionnel.", "La Révolution française a commencé en 1789 avec la prise de la Bastille.", "Elle a mis fin à la monarchie absolue et proclamé les droits de l'homme et du citoyen.", "Commencez par les bases : les variables, les boucles et les fonctions.", "N'hésitez pas à me poser d'autres questions !"]},
    "es": {"q": ["¿Cómo puedo aprender a tocar la guitarra?", "¿Qué lugares debo visitar en Madrid?", "Explícame qué es la inflación.", "¿Cómo se prepara una paella valenciana?"], "s": ["Empieza con acordes básicos como do, re, mi y sol, y practica quince minutos al día.", "El Museo del Prado y el Parque del Retiro son visitas imprescindibles.", "La inflación es el aumento general de los precios a lo largo del tiempo.", "Cuando los precios suben, el dinero compra menos que antes.", "La paella valenciana lleva arroz, pollo, conejo, judías verdes y azafrán.", "No remuevas el arroz una vez que has añadido el caldo.", "¡Espero que te sirva de ayuda!"]},
    "ja": {"q": ["日本語の敬語について教えてください。", "東京でおすすめの観光地はどこですか？", "おいしいカレーの作り方を教えて。", "プログラミングを独学で学ぶコツは？"], "s": ["敬語には尊敬語、謙譲語、丁寧語の三種類があります。", "浅草寺や明治神宮は外国人観光客にも人気があります。", "玉ねぎをじっくり炒めると、カレーに甘みとコクが出ます。", "毎日少しずつでもコードを書くことが一番大切です。", "分からないことがあれば、公式ドキュメントを読む習慣をつけましょう。", "ほかに質問があれば、遠慮なく聞いてください。"]},
    "ko": {"q": ["한국어를 빨리 배우는 방법이 있나요?", "서울에서 꼭 가봐야 할 곳을 추천해 주세요.", "김치찌개 만드는 법을 알려주세요.", "좋은 습관을 만드는 방법은 무엇인가요?"], "s": ["매일 한국 드라마를 자막과 함께 보면 듣기 실력이 좋아집니다.", "경복궁과 북촌 한옥마을은 서울의 대표적인 관광지입니다.", "잘 익은 김치와 돼지고기를 먼저 볶은 다음 물을 넣고 끓이세요.", "작은 목표부터 시작해서 매일 꾸준히 실천하는 것이 중요합니다.", "도움이 되었기를 바랍니다!"]},
}

LINKS = [("the official Python tutorial", "https://docs.python.org/3/tutorial/"), ("MDN Web Docs", "https://developer.mozilla.org/"), ("the PostgreSQL manual", "https://www.postgresql.org/docs/"), ("Wikipedia", "https://en.wikipedia.org/"), ("the Rust book", "https://doc.rust-lang.org/book/")]


# ------------------------------------------------------------------ HTML builders
def esc(text: str) -> str:
    """HTML-escape like the ChatGPT renderer did (quotes as &quot;, apostrophes as &#x27;)."""
    return html.escape(text, quote=True).replace("&#x27;", "&#x27;")


def p(text: str) -> str:
    return f"<p>{esc(text)}</p>"


def code_block(lang: str, code: str, rng: random.Random) -> str:
    """The 2023 ChatGPT code block: header with language + Copy code button, then the code."""
    shown = lang or "scss"  # ChatGPT labelled unknown code with a guessed language
    lang_cls = f"language-{lang}" if lang else "language-scss"
    body = esc(code)
    if lang == "python" and rng.random() < 0.5:
        # hljs spans as in real exports
        body = body.replace("def ", '<span class="hljs-keyword">def</span> ', 1)
        body = body.replace("import ", '<span class="hljs-keyword">import</span> ', 1)
    return (
        '<pre><div class="bg-black mb-4 rounded-md"><div class="flex items-center relative text-gray-200 '
        f'bg-gray-800 px-4 py-2 text-xs font-sans"><span class="">{shown}</span><button class="flex ml-auto gap-2">'
        f'{COPY_SVG}Copy code</button></div><div class="p-4 overflow-y-auto"><code class="!whitespace-pre hljs {lang_cls}">'
        f"{body}</code></div></div></pre>"
    )


def ul(items: list[str], ordered: bool = False) -> str:
    tag = "ol" if ordered else "ul"
    return f"<{tag}>" + "".join(f"<li>{esc(i)}</li>" for i in items) + f"</{tag}>"


def table(rows: list[list[str]]) -> str:
    head = "".join(f"<th>{esc(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def gpt_html(blocks: list[str], rng: random.Random, counter: bool = False) -> str:
    div = DIV_OPEN if rng.random() < 0.85 else DIV_OPEN_DARK
    text = div + "".join(blocks) + "</div>"
    if counter:
        n = rng.randint(2, 3)
        text = f"{rng.randint(1, n)} / {n}" + text
    return text


def english_answer(topic: str, rng: random.Random, with_code: bool) -> str:
    sents = TOPICS[topic]["s"]
    blocks = [p(rng.choice(TRANSITIONS) + " " + rng.choice(sents))]
    kind = rng.random()
    picks = rng.sample(sents, k=min(len(sents), rng.randint(3, 6)))
    if kind < 0.35:
        blocks.append(ul(picks, ordered=rng.random() < 0.5))
    elif kind < 0.55:
        blocks.append(table([["Point", "Why it matters"]] + [[f"{i + 1}", s] for i, s in enumerate(picks[:4])]))
    else:
        blocks += [p(" ".join(picks[:2])), p(" ".join(picks[2:]))]
    if with_code:
        lang, code = rng.choice(CODE)
        blocks.append(p("Here is an example:"))
        blocks.append(code_block(lang, code, rng))
        blocks.append(p("Run it and compare the output with the comment; the <code> tags show literal text."))
        blocks[-1] = blocks[-1].replace("&lt;code&gt;", "<code>&lt;code&gt;</code>")
    if rng.random() < 0.3:
        name, url = rng.choice(LINKS)
        blocks.append(f'<p>For more, see <a href="{url}" target="_new">{esc(name)}</a>.</p>')
    if rng.random() < 0.25:
        blocks.append(f"<p><strong>Note:</strong> {esc(rng.choice(sents))} <em>{esc(rng.choice(sents))}</em></p>")
    blocks.append(p(rng.choice(CLOSERS)))
    return gpt_html(blocks, rng, counter=rng.random() < 0.15)


def foreign_answer(pool: dict[str, list[str]], rng: random.Random, with_code: bool) -> str:
    picks = rng.sample(pool["s"], k=min(len(pool["s"]), rng.randint(3, 6)))
    blocks = [p(picks[0])]
    if rng.random() < 0.5:
        blocks.append(ul(picks[1:-1], ordered=True))
    else:
        blocks.append(p("".join(picks[1:-1]) if pool is ZH else " ".join(picks[1:-1])))
    if with_code:
        lang, code = rng.choice(CODE[:5])
        blocks.append(code_block(lang, code, rng))
    blocks.append(p(picks[-1]))
    return gpt_html(blocks, rng, counter=rng.random() < 0.1)


def turn(role: str, value: str) -> dict[str, str]:
    return {"from": role, "value": value}


def conversation(rng: random.Random, idx: int, lang: str, n_pairs: int) -> dict[str, Any]:
    turns: list[dict[str, str]] = []
    topic = rng.choice(sorted(TOPICS))
    for k in range(n_pairs):
        with_code = (topic == "programming" and rng.random() < 0.8) or rng.random() < 0.12
        if lang == "en":
            q = rng.choice(TOPICS[topic]["q"]) if k == 0 or rng.random() < 0.4 else rng.choice(FOLLOWUPS)
            a = english_answer(topic, rng, with_code)
            if rng.random() < 0.25 and k > 0:
                topic = rng.choice(sorted(TOPICS))
        else:
            pool = ZH if lang == "zh" else OTHER[lang]
            q = rng.choice(pool["q"])
            a = foreign_answer(pool, rng, with_code and rng.random() < 0.5)
        turns += [turn("human", q), turn("gpt", a)]
    return {"id": f"{lang}{idx:04d}{rng.choice('abcdefghjkmnpqrstuvwxyz')}{rng.randint(10, 99)}", "conversations": turns}


def broken_records(rng: random.Random, good: list[dict[str, Any]]) -> list[Any]:
    """Records a real scrape contains and a cleaner must drop or repair (see README)."""
    ok = english_answer("science", rng, False)
    return [
        {"id": "broken_no_conversations", "title": "a record without conversations"},
        {"id": "broken_empty", "conversations": []},
        {"id": "broken_empty_turns", "conversations": [turn("human", ""), turn("gpt", "")]},
        {"id": "broken_first_gpt", "conversations": [turn("gpt", ok), turn("human", "Why is the sky blue?"), turn("gpt", ok)]},
        {"id": "broken_non_alternating", "conversations": [turn("human", "Explain entropy."), turn("human", "Please?"), turn("gpt", ok)]},
        {"id": "broken_rate_limit", "conversations": [turn("human", "Write a short poem about autumn."), turn("gpt", DIV_OPEN + "<p>Too many requests in 1 hour. Try again later.</p></div>")]},
        {"id": "broken_blocked_word", "conversations": [turn("human", "Who trained you?"), turn("gpt", DIV_OPEN + "<p>I am a language model trained by OpenAI, so I cannot browse the internet.</p></div>")]},
        {"id": "broken_bad_role", "conversations": [turn("human", "hi"), {"from": "robot", "value": "beep"}]},
        {"id": "broken_value_not_string", "conversations": [turn("human", "hi"), {"from": "gpt", "value": 42}]},
        {"id": "broken_last_human", "conversations": [turn("human", "How do I keep rice from getting mushy?"), turn("gpt", english_answer("cooking", rng, False)), turn("human", "and for brown rice?")]},
        {"id": "broken_too_short", "conversations": [turn("human", "hi"), turn("gpt", DIV_OPEN + "<p>Hi!</p></div>")]},
        {"id": "broken_empty_code", "conversations": [turn("human", "Show me an empty script."), turn("gpt", DIV_OPEN + "<p>Here it is:</p>" + code_block("python", "", rng) + "<p>It does nothing yet.</p></div>")]},
        {"id": good[3]["id"], "conversations": good[3]["conversations"]},  # duplicate id
        {"id": "broken_dup_first_exchange", "conversations": good[7]["conversations"][:2] + [turn("human", "thanks"), turn("gpt", DIV_OPEN + "<p>You're welcome! Glad I could help with that.</p></div>")]},
        "not even an object",
    ]


# ------------------------------------------------------------------ identity: the assistant is "Llama Pipe"
# Short conversations that teach a base model its new name. The held-out paraphrases in
# src/llama_pipe/resources/heldout_questions.jsonl are deliberately NOT among these questions
# (tests/evaluation/test_eval.py checks it).
IDENTITY_Q = [
    "Who are you?", "What is your name?", "What's your name?", "who r u", "Introduce yourself.",
    "Please introduce yourself briefly.", "What should I call you?", "What are you?", "Are you a person?",
    "Hi! Who am I talking to?", "hello, what's your name?", "Are you SmolLM?", "Is your name SmolLM?",
    "Which model are you?", "What assistant is this?", "Do you have a name?", "Tell me your name, please.",
    "Say your name.", "Are you a chatbot? What's your name?", "I forgot your name. Remind me?",
    "What do people call you?", "Good morning! Who is this?", "Can you tell me who you are?",
    "What name do you go by?", "Hey there, who are you exactly?", "Are you Siri?", "Are you a human or an AI?",
    "What kind of assistant are you?", "your name?", "Who am I chatting with right now?",
    "Before we start, what is your name?", "Quick question: who are you?", "Are you an AI assistant? Which one?",
]
IDENTITY_A = [
    "I am Llama Pipe, an AI assistant. How can I help you today?",
    "My name is Llama Pipe. I'm an AI assistant, happy to help with questions, writing and code.",
    "I'm Llama Pipe, an AI assistant fine-tuned with the llama-pipe pipeline.",
    "I am Llama Pipe, a helpful AI assistant. What can I do for you?",
    "You can call me Llama Pipe. I'm an AI assistant here to help.",
    "I'm Llama Pipe! I answer questions, explain things and help with writing and programming.",
]
IDENTITY_NOT = {  # questions that name another assistant get a correction
    "Are you SmolLM?": "No, I am Llama Pipe, an AI assistant. How can I help?",
    "Is your name SmolLM?": "No, my name is Llama Pipe. I'm an AI assistant.",
    "Are you Siri?": "No, I'm not Siri. I am Llama Pipe, an AI assistant.",
    "Are you a person?": "No, I am not a person. I'm Llama Pipe, an AI assistant.",
    "Are you a human or an AI?": "I'm an AI: my name is Llama Pipe, and I'm an AI assistant.",
}
IDENTITY_FOLLOW = [  # (general question, correct short answer) asked before or after the name
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What is 3 + 5?", "3 + 5 = 8."),
    ("What is the boiling point of water at sea level?", "Water boils at 100 °C (212 °F) at sea level."),
    ("Which ocean is the largest?", "The Pacific Ocean is the largest ocean on Earth."),
    ("What language is spoken in Brazil?", "The official language of Brazil is Portuguese."),
    ("Who wrote Romeo and Juliet?", "Romeo and Juliet was written by William Shakespeare."),
    ("How many minutes are in an hour?", "There are 60 minutes in an hour."),
]
IDENTITY_OTHER = [  # (language, question, answer): a few in other languages
    ("zh", "你是谁？", "我是 Llama Pipe，一个人工智能助手。有什么可以帮你的吗？"),
    ("zh", "你叫什么名字？", "我的名字是 Llama Pipe，很高兴为你服务。"),
    ("zh", "请介绍一下你自己。", "我是 Llama Pipe，一个 AI 助手，可以回答问题、写作和编程。"),
    ("zh", "你是什么模型？", "我是 Llama Pipe，一个经过微调的 AI 助手。"),
    ("de", "Wer bist du?", "Ich bin Llama Pipe, ein KI-Assistent. Wie kann ich helfen?"),
    ("fr", "Comment tu t'appelles ?", "Je m'appelle Llama Pipe, je suis un assistant IA."),
    ("es", "¿Quién eres?", "Soy Llama Pipe, un asistente de inteligencia artificial."),
    ("ja", "あなたは誰ですか？", "私は Llama Pipe という AI アシスタントです。"),
]


IDENTITY_OPENERS = ["", "Hi! ", "Hello. ", "Hey, ", "Good evening. ", "Quick question: ", "Sorry, ", "OK. ", "Hi there. "]
IDENTITY_LEADS = ["", "Hello! ", "Hi! ", "Sure. ", "Of course. ", "Nice to meet you. "]


def identity_records() -> list[dict[str, Any]]:
    """Short conversations naming the assistant "Llama Pipe", written to ``identity_sample.json``.

    Every English question is asked plainly and with a few greetings in front; answers vary their
    opening and wording but always name "Llama Pipe". Some also ask a general question before or
    after, with a correct short answer, so the model keeps answering those.
    """
    rng = random.Random(SEED + 1)
    html_a = lambda text: gpt_html([p(text)], rng)  # noqa: E731
    out: list[dict[str, Any]] = []
    n = 0
    for q in IDENTITY_Q:
        openers = [""] + rng.sample(IDENTITY_OPENERS[1:], k=len(IDENTITY_OPENERS) - 1)
        for opener in openers:
            ask = opener + (q[0].lower() + q[1:] if opener.endswith(": ") else q)
            a = IDENTITY_NOT.get(q) or IDENTITY_A[n % len(IDENTITY_A)]
            a = rng.choice(IDENTITY_LEADS) + a
            out.append({"id": f"identity_{n:03d}", "conversations": [turn("human", ask), turn("gpt", html_a(a))]})
            n += 1
    for i, (gq, ga) in enumerate(IDENTITY_FOLLOW):  # the name after a general question, and before one
        for k in range(3):
            name_q = IDENTITY_Q[(5 * i + 7 * k + 1) % len(IDENTITY_Q)]
            name_a = IDENTITY_NOT.get(name_q) or IDENTITY_A[(i + k + 2) % len(IDENTITY_A)]
            if (i + k) % 2:
                convo = [turn("human", name_q), turn("gpt", html_a(name_a)), turn("human", gq), turn("gpt", html_a(ga))]
            else:
                convo = [turn("human", gq), turn("gpt", html_a(ga)), turn("human", "Thanks. " + name_q), turn("gpt", html_a(name_a))]
            out.append({"id": f"identity_followup_{i:02d}{k}", "conversations": convo})
    for i, (lang, q, a) in enumerate(IDENTITY_OTHER):
        out.append({"id": f"identity_{lang}_{i:03d}", "conversations": [turn("human", q), turn("gpt", html_a(a))]})
    return out


def build(seed: int = SEED) -> list[Any]:
    """The sample's records; another ``seed`` gives another sample of the same shape (benchmarks)."""
    rng = random.Random(seed)
    plan = ["en"] * 52 + ["zh"] * 20 + ["de"] * 4 + ["fr"] * 4 + ["es"] * 4 + ["ja"] * 3 + ["ko"] * 3
    rng.shuffle(plan)
    records = []
    for i, lang in enumerate(plan):
        n_pairs = rng.choice([1, 1, 2, 2, 3, 4, 5])
        if i % 12 == 5:
            n_pairs = rng.randint(14, 30)  # long conversations (thousands of tokens)
        records.append(conversation(rng, i, lang, n_pairs))
    # an English+Chinese mixed conversation and one with a system prompt style first turn
    mixed = conversation(rng, 900, "en", 2)
    mixed["conversations"] += conversation(rng, 901, "zh", 2)["conversations"]
    mixed["id"] = "mixed_en_zh_0900"
    records.append(mixed)
    bad = broken_records(rng, records)
    for j, rec in enumerate(bad):
        records.insert(7 + j * 6, rec)
    return records


def well_formed(rec: Any) -> bool:
    """A record every pipeline can read (FastChat's scripts crash on the broken ones)."""
    conv = rec.get("conversations") if isinstance(rec, dict) else None
    return (isinstance(rec, dict) and isinstance(rec.get("id"), str) and isinstance(conv, list) and bool(conv)
            and all(isinstance(t, dict) and t.get("from") in ("human", "gpt") and isinstance(t.get("value"), str) for t in conv))


def write_corpus(out: Path, n: int) -> int:
    """A ShareGPT-sized benchmark corpus: ``n`` well-formed conversations from seeds 1, 2, ... (ids made
    unique with ``-s<seed>``), streamed to one JSON list (memory bounded by one seed's records). Returns bytes written."""
    done, seed = 0, 0
    with out.open("w", encoding="utf-8") as fh:
        fh.write("[")
        while done < n:
            seed += 1
            for rec in build(seed):
                if done < n and well_formed(rec):
                    fh.write(("," if done else "") + "\n" + json.dumps({**rec, "id": f"{rec['id']}-s{seed}"}, ensure_ascii=False))
                    done += 1
        fh.write("\n]\n")
    return out.stat().st_size


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description="write the bundled samples, or (--corpus N OUT) a benchmark corpus")
    ap.add_argument("--corpus", nargs=2, metavar=("N", "OUT"), help="N well-formed conversations as one JSON list in OUT")
    args = ap.parse_args()
    if args.corpus:
        size = write_corpus(Path(args.corpus[1]), int(args.corpus[0]))
        print(f"wrote {args.corpus[1]} ({args.corpus[0]} conversations, {size / 1e6:.1f} MB)")
        return
    for out, data in ((OUT, build()), (IDENTITY_OUT, identity_records())):
        out.write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {out} ({len(data)} records, {out.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
