"""Seeded synthetic chat corpus for the demo model, and the chat template it is rendered with.

`render` is a Python twin of `CHAT_TEMPLATE` (Qwen2.5 / Hermes style): the model only ever sees
text the template would produce, and `train.py --eval` checks the two byte for byte.
"""

import json
import random

DEFAULT_SYSTEM = "You are a helpful assistant."
TOOLS_HEAD = ("\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
              "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
TOOLS_TAIL = ("\n</tools>\n\nFor each function call, return a json object with function name and "
              "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
              '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')
# Raw string: jinja itself turns the \n escapes inside its string literals into newlines.
CHAT_TEMPLATE = r"""{%- macro text(c) -%}
{%- if c is none -%}{%- elif c is string -%}{{- c -}}
{%- else -%}{%- for p in c -%}{%- if p.text is defined -%}{{- p.text -}}{%- endif -%}{%- endfor -%}{%- endif -%}
{%- endmacro -%}
{%- if messages and messages[0].role == 'system' -%}{%- set sys = text(messages[0].content) -%}
{%- else -%}{%- set sys = 'You are a helpful assistant.' -%}{%- endif -%}
{{- '<|im_start|>system\n' + sys -}}
{%- if tools -%}
{{- '\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>' -}}
{%- for tool in tools -%}{{- '\n' -}}{{- tool | tojson -}}{%- endfor -%}
{{- '\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>' -}}
{%- endif -%}
{{- '<|im_end|>\n' -}}
{%- for message in messages -%}
{%- if message.role == 'user' or (message.role == 'system' and not loop.first) or (message.role == 'assistant' and not message.tool_calls) -%}
{{- '<|im_start|>' + message.role + '\n' + text(message.content) + '<|im_end|>\n' -}}
{%- elif message.role == 'assistant' -%}
{{- '<|im_start|>assistant' -}}
{%- if message.content -%}{{- '\n' + text(message.content) -}}{%- endif -%}
{%- for tool_call in message.tool_calls -%}
{%- if tool_call.function is defined -%}{%- set tool_call = tool_call.function -%}{%- endif -%}
{{- '\n<tool_call>\n{"name": "' + tool_call.name + '", "arguments": ' -}}
{%- if tool_call.arguments is string -%}{{- tool_call.arguments -}}{%- else -%}{{- tool_call.arguments | tojson -}}{%- endif -%}
{{- '}\n</tool_call>' -}}
{%- endfor -%}
{{- '<|im_end|>\n' -}}
{%- elif message.role == 'tool' -%}
{%- if loop.first or messages[loop.index0 - 1].role != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}
{{- '\n<tool_response>\n' + text(message.content) + '\n</tool_response>' -}}
{%- if loop.last or messages[loop.index0 + 1].role != 'tool' -%}{{- '<|im_end|>\n' -}}{%- endif -%}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"""


def tojson(x) -> str:
    """What transformers' `tojson` filter emits: key order kept, non-ASCII kept."""
    return json.dumps(x, ensure_ascii=False)


def render(messages: list[dict], tools: list[dict] | None = None,
           add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
    """Render like CHAT_TEMPLATE, as (text, is_assistant_output) segments for the loss mask."""
    segs: list[tuple[str, bool]] = []
    sys = messages[0]["content"] if messages and messages[0]["role"] == "system" else DEFAULT_SYSTEM
    segs.append(("<|im_start|>system\n" + sys, False))
    if tools:
        segs.append((TOOLS_HEAD + "".join("\n" + tojson(t) for t in tools) + TOOLS_TAIL, False))
    segs.append(("<|im_end|>\n", False))
    for i, m in enumerate(messages):
        role, content = m["role"], m.get("content") or ""
        if role == "system" and i == 0:
            continue
        if role == "assistant":
            body = content if not m.get("tool_calls") else ("\n" + content if content else "")
            for tc in m.get("tool_calls") or []:
                f = tc.get("function", tc)
                args = f["arguments"] if isinstance(f["arguments"], str) else tojson(f["arguments"])
                body += '\n<tool_call>\n{"name": "' + f["name"] + '", "arguments": ' + args + "}\n</tool_call>"
            # The trained span starts where generation starts (after "assistant\n").
            head = "<|im_start|>assistant\n"
            if m.get("tool_calls"):
                body = body[1:]
            segs += [(head, False), (body + "<|im_end|>", True), ("\n", False)]
        elif role == "tool":
            first = i == 0 or messages[i - 1]["role"] != "tool"
            last = i == len(messages) - 1 or messages[i + 1]["role"] != "tool"
            segs.append((("<|im_start|>user" if first else "") + "\n<tool_response>\n" + content
                         + "\n</tool_response>" + ("<|im_end|>\n" if last else ""), False))
        else:
            segs.append(("<|im_start|>" + role + "\n" + content + "<|im_end|>\n", False))
    if add_generation_prompt:
        segs.append(("<|im_start|>assistant\n", False))
    return segs


def _w(s: str, sep: str | None = None) -> list[str]:
    return s.split(sep)


# ----------------------------------------------------------------------------------------------
# Vocabulary. The eval cities (HELD_OUT) never appear anywhere in the corpus.
HELD_OUT = _w("Oslo Lima Nairobi Reykjavik Hanoi Quito Dakar Tbilisi Montevideo Helsinki")
CITIES = [c.replace("_", " ") for c in _w("""London Paris Berlin Madrid Rome Vienna Prague Warsaw Budapest
Lisbon Dublin Amsterdam Brussels Copenhagen Stockholm Athens Istanbul Cairo Lagos Accra Cape_Town
Johannesburg Casablanca Tunis Addis_Ababa Kampala Kigali Tokyo Osaka Seoul Beijing Shanghai
Hong_Kong Taipei Manila Jakarta Bangkok Singapore Kuala_Lumpur Delhi Mumbai Chennai Karachi Dhaka
Kathmandu Tehran Baghdad Riyadh Dubai Doha Moscow Kyiv Riga Vilnius Tallinn Sydney Melbourne
Perth Auckland Wellington Toronto Vancouver Montreal Chicago Boston Seattle Denver Miami Atlanta
Houston Dallas Phoenix New_York Los_Angeles San_Francisco Mexico_City Havana Bogota Caracas
Santiago Buenos_Aires Sao_Paulo Edinburgh Manchester Glasgow Munich Hamburg Zurich Geneva Milan
Naples Barcelona Valencia Seville Porto Krakow Bergen Gothenburg Turku Marseille Lyon Nice Austin
Portland Ottawa Calgary Brisbane Adelaide Hobart Kyoto Busan Hanover Leeds Cork Bristol Sofia
Belgrade Zagreb Bucharest Ankara Beirut Amman Muscat Colombo Lahore Harare Lusaka Luanda Maputo
Windhoek Tirana Skopje Minsk Chisinau Yerevan Baku Almaty Tashkent Ulaanbaatar Vientiane Yangon
Phnom_Penh Cebu Medan Fresno Omaha Tulsa Memphis Nashville Orlando Tampa Detroit Cleveland""")]
STATES = ["CA", "NY", "TX", "FL", "WA", "IL", "MA", "CO", "OR", "GA"]
SYL = _w("ka lo ven dra mi sor tan bel ri gan ost mar vi del ru pe zan for li nor ba qu es tor "
         "wen yl hav kir ash mon do ul bre fen ga zi pol ter un ob")
COUNTRIES = [p.split(":") for p in _w("""France:Paris Germany:Berlin Spain:Madrid Italy:Rome Japan:Tokyo
Egypt:Cairo Canada:Ottawa Austria:Vienna Poland:Warsaw Greece:Athens Ireland:Dublin Portugal:Lisbon
Sweden:Stockholm Denmark:Copenhagen Hungary:Budapest Thailand:Bangkok Ghana:Accra Iran:Tehran
Russia:Moscow Ukraine:Kyiv Latvia:Riga Estonia:Tallinn Cuba:Havana Colombia:Bogota Chile:Santiago
Argentina:Buenos_Aires Mexico:Mexico_City Turkey:Ankara Lebanon:Beirut Jordan:Amman""")]
CATEGORY = {k: v.split() for k, v in {
    "fruits": "apple banana cherry grape mango orange pear peach plum lemon kiwi melon",
    "animals": "dog cat horse cow sheep lion tiger elephant rabbit fox wolf bear",
    "colors": "red blue green yellow purple orange black white pink brown gray",
    "vegetables": "carrot potato onion tomato pepper lettuce cabbage pea spinach corn",
    "sports": "football tennis basketball swimming cycling running golf rugby hockey",
    "instruments": "piano guitar violin drums flute trumpet cello harp saxophone",
    "planets": "Mercury Venus Earth Mars Jupiter Saturn Uranus Neptune"}.items()}
SOUNDS = dict(p.split(":") for p in _w("dog:woof cat:meow cow:moo sheep:baa duck:quack lion:roar "
                                       "horse:neigh owl:hoot pig:oink frog:ribbit"))
OPPOSITES = dict(p.split(":") for p in _w("hot:cold big:small up:down fast:slow happy:sad day:night "
                                          "old:new light:dark open:closed early:late wet:dry strong:weak"))
DAYS, MONTHS = _w("Monday Tuesday Wednesday Thursday Friday Saturday Sunday"), _w(
    "January February March April May June July August September October November December")
WORDS = _w("cat sun tree house river book apple music garden window cloud bread water light")
EXPLAIN = [line.split(" | ") for line in """What is photosynthesis? | Photosynthesis is how plants make food. They use sunlight, water and carbon dioxide to make sugar, and they release oxygen.
Why is the sky blue? | Sunlight is made of many colors. Air scatters blue light more than red light, so we see blue coming from all over the sky.
What is rain? | Rain is water that falls from clouds. Water vapor cools, forms droplets, and when they get heavy they fall to the ground.
What is a computer? | A computer is a machine that follows instructions, called programs, to store and process information.
What is gravity? | Gravity is the force that pulls things toward each other. It keeps us on the ground and the Moon around the Earth.
What is the internet? | The internet is a global network of computers that share information with each other.
How do plants grow? | Plants grow from seeds. They need water, light, air and nutrients from the soil to grow roots, stems and leaves.
What is a cloud? | A cloud is a large group of tiny water droplets or ice crystals floating in the air.
What is an API? | An API is a set of rules that lets one program ask another program for data or actions.
What is a function in programming? | A function is a named block of code that takes inputs, does some work and returns a result.
Why do we sleep? | Sleep lets the body rest and repair itself, and it helps the brain store memories.
What is the Sun? | The Sun is the star at the center of our solar system. It gives the Earth light and heat.
What is a language model? | A language model is a program that predicts the next word in a text. It can be used to answer questions and chat.
What is JSON? | JSON is a simple text format for data. It uses objects with keys and values, and lists in square brackets.
How does a rainbow form? | A rainbow forms when sunlight passes through raindrops. The drops bend the light and split it into colors.
What is the weather? | Weather is the state of the air at a place and time, such as sunny, rainy, windy, hot or cold.""".splitlines()]
GREET = [line.split(" | ") for line in """Hi! | Hello! How can I help you today?
Hello | Hi there! What can I do for you?
Hey there | Hey! How can I help?
Good morning! | Good morning! How can I help you today?
How are you? | I'm doing well, thank you! How can I help you?
Who are you? | I am a small demo assistant. I can answer simple questions and call tools.
What can you do? | I can chat, answer simple questions, do small sums, and call tools such as weather or search when they are provided.
Thanks! | You're welcome!
Thank you very much. | You're welcome! Let me know if you need anything else.
Bye! | Goodbye! Have a nice day.
Tell me a joke. | Why did the computer go to sleep? It was tired of all the bytes!
What is your name? | I am the mlxtg demo assistant.""".splitlines()]
CONDITIONS = _w("sunny cloudy rainy windy snowy foggy clear stormy")
TOPICS = _w("electric cars|the history of {c}|museums in {c}|pasta recipes|how volcanoes work|"
          "the tallest mountains|solar panels|learning to play the {i}|healthy breakfast ideas|"
          "{f} nutrition facts|the best time to visit {c}|train tickets to {c}|how to grow {v}|"
          "news about {s}|{p} facts", "|")
NAMES = _w("alice bob carol dave erin frank grace heidi ivan judy mallory olivia peggy trent")
TASKS = _w("call mom|buy milk|water the plants|pay the rent|send the report|walk the dog|"
         "book a table|take my medicine|check the oven|call {n}", "|")
PHRASES = _w("good morning|thank you|where is the station|I love music|see you tomorrow", "|")
LANGS, CURR = _w("Spanish French German Italian Portuguese Dutch"), _w("USD EUR GBP JPY CHF CAD AUD SEK")
SYSTEMS = [DEFAULT_SYSTEM, "You are a friendly assistant.", "You are a concise assistant.", "You are a helpful assistant. Answer briefly."]


class Gen:
    """All random choices go through one seeded `random.Random`, so a seed fixes the corpus."""

    def __init__(self, seed: int):
        self.r = random.Random(seed)

    def city(self) -> str:
        r = self.r
        if r.random() < 0.45:  # invented names teach the model to copy, not to remember
            name = "".join(r.choice(SYL) for _ in range(r.randint(2, 3))).capitalize()
            if any(h.lower() in name.lower() for h in HELD_OUT):
                return self.city()
            return name + r.choice(["", "", "", " City", "ville", "burg", " Bay"])
        return r.choice(CITIES) + (", " + r.choice(STATES) if r.random() < 0.12 else "")

    def fill(self, s: str) -> str:
        r = self.r
        return s.format(c=self.city(), i=r.choice(CATEGORY["instruments"]), n=r.choice(NAMES).title(),
                        f=r.choice(CATEGORY["fruits"]), v=r.choice(CATEGORY["vegetables"]),
                        s=r.choice(CATEGORY["sports"]), p=r.choice(CATEGORY["planets"]))

    # -- plain chat ------------------------------------------------------------------------------
    def chat_turn(self) -> tuple[str, str]:
        r = self.r
        k = r.randrange(13)
        if k < 2:
            q, ans = r.choice([GREET, EXPLAIN][k])
            return q, ans
        if k == 2:
            co, cap = r.choice(COUNTRIES)
            q = r.choice(["What is the capital of {}?", "Capital of {}?", "Which city is the capital of {}?"])
            return q.format(co), f"The capital of {co} is {cap.replace('_', ' ')}."
        if k == 3:
            a, b = r.randint(0, 50), r.randint(0, 50)
            op = r.choice("+-*") if max(a, b) < 13 else r.choice("+-")
            val = a + b if op == "+" else a - b if op == "-" else a * b
            q = r.choice(["What is {} {} {}?", "Compute {} {} {}.", "{} {} {} = ?", "Can you work out {} {} {}?"])
            return q.format(a, op, b), f"{a} {op} {b} = {val}."
        if k == 4:
            a = r.randint(0, 20)
            b = a + r.randint(2, 9)
            if r.random() < 0.3:
                return f"Count down from {b} to {a}.", ", ".join(map(str, range(b, a - 1, -1))) + "."
            return f"Count from {a} to {b}.", ", ".join(map(str, range(a, b + 1))) + "."
        if k == 5:
            cat = r.choice(list(CATEGORY))
            n = r.randint(2, 5)
            items = r.sample(CATEGORY[cat], n)
            q = r.choice(["List {} {}.", "Name {} {}.", "Give me {} {}, please.", "Can you list {} {}?"])
            return q.format(n, cat), f"Here are {n} {cat}:\n" + "\n".join(
                f"{i + 1}. {w.capitalize()}" for i, w in enumerate(items))
        if k == 6:
            animal, snd = r.choice(list(SOUNDS.items()))
            return f"What sound does a {animal} make?", f"A {animal} says \"{snd}\"."
        if k == 7:
            w, o = r.choice(list(OPPOSITES.items()))
            return f"What is the opposite of {w}?", f"The opposite of \"{w}\" is \"{o}\"."
        if k == 8:
            seq, i = r.choice([(DAYS, r.randrange(7)), (MONTHS, r.randrange(12))])
            return f"What comes after {seq[i]}?", f"{seq[(i + 1) % len(seq)]} comes after {seq[i]}."
        if k == 9:
            w = r.choice(WORDS + [self.city()])
            q = r.choice(["Repeat after me: {}", "Say \"{}\".", "Write {} in capital letters."])
            return q.format(w), w.upper() if "capital" in q else w
        if k == 10:
            nums = [r.randint(0, 99) for _ in range(r.randint(3, 6))]
            return f"Sort these numbers: {', '.join(map(str, nums))}.", ", ".join(map(str, sorted(nums))) + "."
        if k == 11:
            a, b = r.sample(range(100), 2)
            return f"Which is bigger, {a} or {b}?", f"{max(a, b)} is bigger than {min(a, b)}."
        n = r.randint(0, 99)
        return f"Is {n} even or odd?", f"{n} is {'odd' if n % 2 else 'even'}."

    # -- tools -----------------------------------------------------------------------------------
    def tool(self, family: str) -> tuple[dict, dict]:
        """A tool definition in one of several spellings, plus the meaning of each parameter."""
        r = self.r
        S = lambda d: {"type": "string", "description": d}  # noqa: E731
        if family == "weather":
            name = r.choice(["get_weather", "get_current_weather", "weather", "fetch_weather", "current_weather"])
            loc = r.choice(["location", "city", "location", "city", "place"])
            props = {loc: S(r.choice(["The city and state, e.g. San Francisco, CA", "The city name",
                                      "City to get the weather for"]))}
            if r.random() < 0.6:
                props["unit"] = {"type": "string", "enum": ["celsius", "fahrenheit"]}
            desc = r.choice(["Get the current weather in a given location", "Get the weather for a city"])
            roles = {"loc": loc, "unit": "unit" if "unit" in props else None}
        elif family == "time":
            name, loc = r.choice(["get_time", "get_current_time", "current_time"]), r.choice(["location", "city", "timezone"])
            props, desc, roles = {loc: S("City or timezone")}, "Get the current local time", {"loc": loc}
        elif family == "search":
            name, q = r.choice(["web_search", "search", "search_web"]), r.choice(["query", "q"])
            props, desc, roles = {q: S("The search query")}, "Search the web", {"query": q}
        elif family == "calc":
            name = r.choice(["calculator", "calculate", "evaluate_expression"])
            props, desc, roles = {"expression": S("A math expression")}, "Evaluate a math expression", {}
        elif family == "email":
            name, desc, roles = r.choice(["send_email", "email_send"]), "Send an email", {}
            props = {"to": S("Recipient address"), "subject": S("Subject line"), "body": S("Message text")}
        elif family == "reminder":
            name = r.choice(["set_reminder", "create_reminder"])
            props, desc, roles = {"text": S("What to remember"), "time": S("When, e.g. 18:00")}, "Set a reminder", {}
        elif family == "translate":
            name, desc, roles = r.choice(["translate", "translate_text"]), "Translate text", {}
            props = {"text": S("Text to translate"), "target_language": S("Language to translate into")}
        elif family == "stock":
            name, sym = r.choice(["get_stock_price", "stock_price"]), r.choice(["symbol", "ticker"])
            props, desc, roles = {sym: S("Ticker symbol")}, "Get the latest stock price", {"sym": sym}
        else:  # currency
            name, desc, roles = r.choice(["convert_currency", "currency_convert"]), "Convert money", {}
            props = {"amount": {"type": "number"}, "from_currency": S("ISO code"), "to_currency": S("ISO code")}
        fn = {"name": name, "description": desc,
              "parameters": {"type": "object", "properties": props, "required": [next(iter(props))]}}
        return {"type": "function", "function": fn}, roles

    def tool_exchange(self, family: str, tool: dict, roles: dict):
        """One request for `tool`: (user text, call arguments, tool result, final answer)."""
        r = self.r
        if family == "weather":
            c = self.city()
            unit = r.choice(["celsius", "fahrenheit"]) if roles["unit"] and r.random() < 0.4 else None
            q = r.choice(["What is the weather in {c}?", "What's the weather like in {c}?", "Weather in {c}?",
                          "How is the weather in {c} today?", "Is it raining in {c}?", "Tell me the weather in {c}.",
                          "Can you check the weather for {c}?", "What's the temperature in {c} right now?",
                          "I'm going to {c} tomorrow. What's the weather there?", "How hot is it in {c}?"])
            user = q.format(c=c) + (f" Use {unit}." if unit else "")
            args = {roles["loc"]: c, **({"unit": unit} if unit else {})}
            t, cond = r.randint(-5, 35), r.choice(CONDITIONS)
            sym = "°F" if unit == "fahrenheit" else "°C"
            if unit == "fahrenheit":
                t = t * 9 // 5 + 32
            res = {"location": c, "temperature": t, "unit": unit or "celsius", "condition": cond}
            ans = r.choice([f"It is currently {t}{sym} and {cond} in {c}.",
                            f"The weather in {c} is {cond} with a temperature of {t}{sym}."])
            if user.startswith("Is it raining"):
                ans = ("Yes, it is raining" if cond in ("rainy", "stormy") else f"No, it is {cond}") + f" in {c} ({t}{sym})."
            return user, args, res, ans
        if family == "time":
            c, hh, mm = self.city(), r.randint(0, 23), r.randint(0, 59)
            user = r.choice(["What time is it in {}?", "What's the local time in {}?", "Current time in {}?"]).format(c)
            return user, {roles["loc"]: c}, {"time": f"{hh:02d}:{mm:02d}"}, f"It is {hh:02d}:{mm:02d} in {c}."
        if family == "search":
            topic = self.fill(r.choice(TOPICS))
            user = r.choice(["Search the web for {}.", "Look up {}.", "Find information about {}.",
                             "Can you search for {}?"]).format(topic)
            snip = f"An overview of {topic}, with key facts and links."
            return (user, {roles["query"]: topic}, {"results": [{"title": topic.capitalize(), "snippet": snip}]},
                    f"Here is what I found about {topic}: {snip}")
        if family == "calc":
            a, b, op = r.randint(2, 999), r.randint(2, 99), r.choice("+-*")
            e = f"{a} {op} {b}"
            val = eval(e)  # noqa: S307 - digits and one operator built just above
            user = r.choice(["Use the calculator to compute {}.", "Calculate {}.", "What is {} exactly?"]).format(e)
            return user, {"expression": e}, {"result": val}, f"{e} = {val}."
        if family == "email":
            to, subj = f"{r.choice(NAMES)}@{r.choice(['example.com', 'mail.org', 'work.net'])}", r.choice(["Meeting", "Hello", "Lunch", "Report"])
            body = self.fill(r.choice(["See you at {c}.", "The report is ready.", "Lunch at noon?", "Thanks for your help!"]))
            user = f"Send an email to {to} with the subject \"{subj}\" saying: {body}"
            return user, {"to": to, "subject": subj, "body": body}, {"status": "sent"}, f"Done! I sent the email to {to}."
        if family == "reminder":
            task, tm = self.fill(r.choice(TASKS)), f"{r.randint(6, 22)}:{r.choice(['00', '15', '30', '45'])}"
            user = r.choice(["Remind me to {} at {}.", "Set a reminder to {} at {}."]).format(task, tm)
            return user, {"text": task, "time": tm}, {"status": "ok"}, f"OK, I will remind you to {task} at {tm}."
        if family == "translate":
            ph, lang = r.choice(PHRASES), r.choice(LANGS)
            tr = "".join(r.choice(SYL) for _ in range(3))
            user = r.choice(["Translate \"{}\" into {}.", "How do you say \"{}\" in {}?"]).format(ph, lang)
            return (user, {"text": ph, "target_language": lang}, {"translation": tr},
                    f"In {lang}, \"{ph}\" is \"{tr}\".")
        if family == "stock":
            sym = "".join(r.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(r.randint(2, 4)))
            p = round(r.uniform(5, 900), 2)
            user = r.choice(["What is the stock price of {}?", "How much is {} trading at?", "Price of {} stock?"]).format(sym)
            return user, {roles["sym"]: sym}, {"symbol": sym, "price": p, "currency": "USD"}, f"{sym} is trading at {p} USD."
        amt, fr, to = r.randint(1, 500), *r.sample(CURR, 2)
        v = round(amt * r.uniform(0.5, 1.5), 2)
        user = r.choice(["Convert {} {} to {}.", "How much is {} {} in {}?"]).format(amt, fr, to)
        return (user, {"amount": amt, "from_currency": fr, "to_currency": to}, {"result": v},
                f"{amt} {fr} is about {v} {to}.")

    def conversation(self) -> tuple[list[dict], list[dict] | None]:
        """One sampled conversation: (messages, tools or None)."""
        r = self.r
        msgs: list[dict] = []
        if r.random() < 0.2:
            msgs.append({"role": "system", "content": r.choice(SYSTEMS)})
        kind = r.random()
        if kind < 0.3:  # plain chat, one to four turns
            for _ in range(r.choice([1, 2, 3, 4])):
                u, a = self.chat_turn()
                msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
            return msgs, None
        fams = ["weather"] * 4 + ["time", "search", "calc", "email", "reminder", "translate", "stock", "currency"]
        chosen = list(dict.fromkeys(r.choice(fams) for _ in range(r.choice([1, 1, 1, 2, 3]))))
        defs = {f: self.tool(f) for f in chosen}
        tools = [d for d, _ in defs.values()]
        r.shuffle(tools)
        if kind < 0.42:  # tools offered but not needed
            u, a = self.chat_turn()
            return [*msgs, {"role": "user", "content": u}, {"role": "assistant", "content": a}], tools
        for _ in range(r.choice([1, 2, 2, 3])):  # more turns amortise the long tools prompt
            fam = r.choice(chosen)
            tool, roles = defs[fam]
            name = tool["function"]["name"]
            if fam == "weather" and r.random() < 0.12:  # two cities at once: parallel calls
                ex = [self.tool_exchange(fam, tool, roles) for _ in range(2)]
                c1, c2 = (e[1][roles["loc"]] for e in ex)
                msgs.append({"role": "user", "content": f"What is the weather in {c1} and in {c2}?"})
            else:
                ex = [self.tool_exchange(fam, tool, roles)]
                msgs.append({"role": "user", "content": ex[0][0]})
            calls = [{"type": "function", "function": {
                "name": name, "arguments": tojson(e[1]) if r.random() < 0.3 else e[1]}} for e in ex]
            msgs.append({"role": "assistant", "content": None, "tool_calls": calls})
            msgs += [{"role": "tool", "name": name, "content": tojson(e[2])} for e in ex]
            msgs.append({"role": "assistant", "content": " ".join(e[3] for e in ex)})
            if r.random() < 0.15:
                u, a = r.choice(GREET[7:9])
                msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
        return msgs, tools

    def sample(self) -> list[tuple[str, bool]]:
        return render(*self.conversation())
