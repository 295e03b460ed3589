"""Parametrised task families for the default training set.

Each family yields (instruction, input, output, test) tuples. The output is the reference solution; the test is
Python that must pass after the output is executed (tools/build_dataset.py checks every one). Written for lorapipe.
"""

import textwrap


def d(s: str) -> str:
    return textwrap.dedent(s).strip("\n") + "\n"


def sum_multiples():
    for k in (2, 3, 4, 5, 6, 7, 9, 10):
        yield (
            f"Write a Python function `sum_multiples_of_{k}(nums)` that returns the sum of the numbers in a list "
            f"that are divisible by {k}.",
            "",
            d(f"""
            def sum_multiples_of_{k}(nums):
                return sum(n for n in nums if n % {k} == 0)
            """),
            f"assert sum_multiples_of_{k}([{k}, {k + 1}, {2 * k}, 1]) == {3 * k}\nassert sum_multiples_of_{k}([]) == 0",
        )


def count_class():
    kinds = [
        ("vowels", "lowercase or uppercase vowels (a, e, i, o, u)", "ch.lower() in 'aeiou'", "Education", 5),
        ("digits", "decimal digits", "ch.isdigit()", "a1b22c333", 6),
        ("uppercase", "uppercase letters", "ch.isupper()", "Hello World OK", 4),
        ("lowercase", "lowercase letters", "ch.islower()", "Hello World", 8),
        ("spaces", "space characters", "ch == ' '", "a b  c", 3),
        ("consonants", "consonant letters (letters that are not vowels)", "ch.isalpha() and ch.lower() not in 'aeiou'",
         "Python 3!", 5),
        ("punctuation", "punctuation characters from string.punctuation", "ch in string.punctuation", "Hi, you! ok?", 3),
    ]
    for name, desc, cond, example, expected in kinds:
        imp = "import string\n\n\n" if "string." in cond else ""
        yield (
            f"Write a function `count_{name}(text)` that counts the {desc} in a string.",
            "",
            imp + d(f"""
            def count_{name}(text):
                return sum(1 for ch in text if {cond})
            """),
            f"assert count_{name}({example!r}) == {expected}\nassert count_{name}('') == 0",
        )


def sequences():
    seqs = [
        ("triangular", "the n-th triangular number (1, 3, 6, 10, ...), with n starting at 1", "n * (n + 1) // 2", 4, 10),
        ("pentagonal", "the n-th pentagonal number (1, 5, 12, 22, ...), with n starting at 1", "n * (3 * n - 1) // 2", 4,
         22),
        ("hexagonal", "the n-th hexagonal number (1, 6, 15, 28, ...), with n starting at 1", "n * (2 * n - 1)", 4, 28),
        ("square_pyramidal", "the sum of the squares 1^2 + 2^2 + ... + n^2", "n * (n + 1) * (2 * n + 1) // 6", 3, 14),
        ("cube_sum", "the sum of the cubes 1^3 + 2^3 + ... + n^3", "(n * (n + 1) // 2) ** 2", 3, 36),
    ]
    for name, desc, expr, n, val in seqs:
        yield (
            f"Write a Python function `{name}(n)` that returns {desc}.",
            "",
            d(f"""
            def {name}(n):
                return {expr}
            """),
            f"assert {name}({n}) == {val}\nassert {name}(1) == 1",
        )
    rec = [
        ("lucas", "the n-th Lucas number, where L(0) = 2, L(1) = 1 and L(n) = L(n-1) + L(n-2)", "2, 1", 5, 11),
        ("pell", "the n-th Pell number, where P(0) = 0, P(1) = 1 and P(n) = 2*P(n-1) + P(n-2)", "0, 1", 5, 29),
        ("jacobsthal", "the n-th Jacobsthal number, where J(0) = 0, J(1) = 1 and J(n) = J(n-1) + 2*J(n-2)", "0, 1", 5,
         11),
    ]
    for name, desc, init, n, val in rec:
        step = {"lucas": "a + b", "pell": "2 * b + a", "jacobsthal": "b + 2 * a"}[name]
        yield (
            f"Write an iterative Python function `{name}(n)` that returns {desc}.",
            "",
            d(f"""
            def {name}(n):
                a, b = {init}
                for _ in range(n):
                    a, b = b, {step}
                return a
            """),
            f"assert {name}({n}) == {val}\nassert {name}(0) == {init.split(',')[0]}",
        )


def elementwise():
    ops = [
        ("add", "the sums", "a + b", [1, 2], [3, 4], [4, 6]),
        ("subtract", "the differences (first minus second)", "a - b", [5, 2], [3, 4], [2, -2]),
        ("multiply", "the products", "a * b", [2, 3], [4, 5], [8, 15]),
        ("maximum", "the larger value", "max(a, b)", [1, 9], [5, 2], [5, 9]),
        ("minimum", "the smaller value", "min(a, b)", [1, 9], [5, 2], [1, 2]),
        ("average", "the mean", "(a + b) / 2", [1, 4], [3, 8], [2.0, 6.0]),
    ]
    for name, desc, expr, x, y, out in ops:
        yield (
            f"Write a function `pairwise_{name}(xs, ys)` that takes two lists of equal length and returns a new list "
            f"with {desc} of the elements at each position. Raise ValueError if the lengths differ.",
            "",
            d(f"""
            def pairwise_{name}(xs, ys):
                if len(xs) != len(ys):
                    raise ValueError("lists must have the same length")
                return [{expr} for a, b in zip(xs, ys)]
            """),
            d(f"""
            assert pairwise_{name}({x}, {y}) == {out}
            try:
                pairwise_{name}([1], [])
                raise AssertionError("expected ValueError")
            except ValueError:
                pass
            """),
        )


def conversions():
    conv = [
        ("celsius_to_fahrenheit", "degrees Celsius to degrees Fahrenheit", "value * 9 / 5 + 32", 100, 212.0),
        ("fahrenheit_to_celsius", "degrees Fahrenheit to degrees Celsius", "(value - 32) * 5 / 9", 212, 100.0),
        ("km_to_miles", "kilometres to miles (1 mile = 1.609344 km)", "value / 1.609344", 10, 6.21),
        ("miles_to_km", "miles to kilometres (1 mile = 1.609344 km)", "value * 1.609344", 3, 4.83),
        ("kg_to_pounds", "kilograms to pounds (1 kg = 2.20462 lb)", "value * 2.20462", 5, 11.02),
        ("pounds_to_kg", "pounds to kilograms (1 kg = 2.20462 lb)", "value / 2.20462", 10, 4.54),
        ("inches_to_cm", "inches to centimetres (1 inch = 2.54 cm)", "value * 2.54", 12, 30.48),
        ("cm_to_inches", "centimetres to inches (1 inch = 2.54 cm)", "value / 2.54", 100, 39.37),
        ("liters_to_gallons", "litres to US gallons (1 gallon = 3.785411784 L)", "value / 3.785411784", 10, 2.64),
    ]
    for name, desc, expr, arg, out in conv:
        yield (
            f"Write a function `{name}(value)` that converts {desc} and rounds the result to two decimal places.",
            "",
            d(f"""
            def {name}(value):
                return round({expr}, 2)
            """),
            f"assert {name}({arg}) == {out}",
        )


def geometry():
    shapes = [
        ("circle_area", "radius", "the area of a circle", "math.pi * radius ** 2", "2", "12.566"),
        ("circle_circumference", "radius", "the circumference of a circle", "2 * math.pi * radius", "1", "6.283"),
        ("sphere_volume", "radius", "the volume of a sphere", "4 / 3 * math.pi * radius ** 3", "1", "4.189"),
        ("sphere_surface", "radius", "the surface area of a sphere", "4 * math.pi * radius ** 2", "1", "12.566"),
        ("cylinder_volume", "radius, height", "the volume of a cylinder", "math.pi * radius ** 2 * height", "1, 2",
         "6.283"),
        ("cone_volume", "radius, height", "the volume of a cone", "math.pi * radius ** 2 * height / 3", "1, 3", "3.142"),
        ("rectangle_diagonal", "width, height", "the length of a rectangle's diagonal", "math.hypot(width, height)",
         "3, 4", "5.0"),
        ("triangle_area", "a, b, c", "the area of a triangle from its three side lengths using Heron's formula",
         "math.sqrt(((a + b + c) / 2) * ((a + b + c) / 2 - a) * ((a + b + c) / 2 - b) * ((a + b + c) / 2 - c))",
         "3, 4, 5", "6.0"),
    ]
    for name, args, desc, expr, call, out in shapes:
        yield (
            f"Write a function `{name}({args})` that returns {desc}, rounded to three decimal places.",
            "",
            "import math\n\n\n" + d(f"""
            def {name}({args}):
                return round({expr}, 3)
            """),
            f"assert {name}({call}) == {out}",
        )


def string_filters():
    for n in (3, 4, 5, 6):
        yield (
            f"Write a function `words_longer_than_{n}(sentence)` that returns the words of a sentence that have more "
            f"than {n} characters, in their original order.",
            "",
            d(f"""
            def words_longer_than_{n}(sentence):
                return [w for w in sentence.split() if len(w) > {n}]
            """),
            f"assert words_longer_than_{n}('a ' + 'x' * {n} + ' ' + 'y' * {n + 1}) == ['{'y' * (n + 1)}']\n"
            f"assert words_longer_than_{n}('') == []",
        )
    for ch in ("a", "s", "t"):
        yield (
            f"Write a function `words_starting_with_{ch}(words)` that returns the words from a list that start with "
            f"the letter '{ch}', ignoring case.",
            "",
            d(f"""
            def words_starting_with_{ch}(words):
                return [w for w in words if w.lower().startswith('{ch}')]
            """),
            f"assert words_starting_with_{ch}(['{ch.upper()}pple', 'zoo', '{ch}ky']) == ['{ch.upper()}pple', '{ch}ky']",
        )


def number_checks():
    checks = [
        ("is_even", "an integer is even", "n % 2 == 0", [(4, True), (7, False)]),
        ("is_perfect_square", "a non-negative integer is a perfect square",
         "math.isqrt(n) ** 2 == n", [(49, True), (50, False)]),
        ("is_power_of_two", "a positive integer is a power of two", "n > 0 and n & (n - 1) == 0",
         [(64, True), (96, False)]),
        ("is_leap_year", "a year is a leap year in the Gregorian calendar",
         "n % 4 == 0 and (n % 100 != 0 or n % 400 == 0)", [(2000, True), (1900, False), (2024, True)]),
        ("is_armstrong", "a positive integer is an Armstrong number (equal to the sum of its digits each raised to the "
         "number of digits)", "n == sum(int(c) ** len(str(n)) for c in str(n))", [(153, True), (154, False)]),
        ("is_harshad", "a positive integer is divisible by the sum of its digits",
         "n % sum(int(c) for c in str(n)) == 0", [(18, True), (19, False)]),
        ("is_palindrome_number", "a non-negative integer reads the same backwards", "str(n) == str(n)[::-1]",
         [(12321, True), (123, False)]),
    ]
    for name, desc, expr, cases in checks:
        imp = "import math\n\n\n" if "math." in expr else ""
        yield (
            f"Write a function `{name}(n)` that returns True if {desc}, otherwise False.",
            "",
            imp + d(f"""
            def {name}(n):
                return {expr}
            """),
            "\n".join(f"assert {name}({a}) is {b}" for a, b in cases),
        )


def dict_ops():
    yield ("Write a function `invert_dict(d)` that swaps the keys and values of a dictionary whose values are unique.",
           "", d("""
           def invert_dict(d):
               return {value: key for key, value in d.items()}
           """), "assert invert_dict({'a': 1, 'b': 2}) == {1: 'a', 2: 'b'}")
    yield ("Write a function `merge_counts(a, b)` that merges two dictionaries of counts, adding the values of keys "
           "present in both.", "", d("""
           def merge_counts(a, b):
               result = dict(a)
               for key, value in b.items():
                   result[key] = result.get(key, 0) + value
               return result
           """), "assert merge_counts({'x': 1, 'y': 2}, {'y': 3, 'z': 4}) == {'x': 1, 'y': 5, 'z': 4}")
    for key_desc, key_expr, sample, out in [
        ("first letter", "word[0].lower()", ["apple", "Avocado", "banana"], {"a": ["apple", "Avocado"], "b": ["banana"]}),
        ("length", "len(word)", ["hi", "yo", "hey"], {2: ["hi", "yo"], 3: ["hey"]}),
        ("last letter", "word[-1].lower()", ["cat", "dog", "hat"], {"t": ["cat", "hat"], "g": ["dog"]}),
    ]:
        fname = "group_by_" + key_desc.replace(" ", "_")
        yield (f"Write a function `{fname}(words)` that groups a list of non-empty words into a dictionary keyed by "
               f"each word's {key_desc}, keeping the original order inside each group.", "", d(f"""
               def {fname}(words):
                   groups = {{}}
                   for word in words:
                       groups.setdefault({key_expr}, []).append(word)
                   return groups
               """), f"assert {fname}({sample!r}) == {out!r}")
    yield ("Write a function `word_frequencies(text)` that returns a dictionary mapping each lowercase word in a text "
           "to the number of times it occurs. Words are separated by whitespace.", "", d("""
           def word_frequencies(text):
               counts = {}
               for word in text.lower().split():
                   counts[word] = counts.get(word, 0) + 1
               return counts
           """), "assert word_frequencies('The cat the hat') == {'the': 2, 'cat': 1, 'hat': 1}")
    yield ("Write a function `key_of_max_value(d)` that returns the key with the largest value in a non-empty "
           "dictionary.", "", d("""
           def key_of_max_value(d):
               return max(d, key=d.get)
           """), "assert key_of_max_value({'a': 3, 'b': 7, 'c': 5}) == 'b'")
    yield ("Write a function `filter_dict_by_value(d, threshold)` that returns a new dictionary with only the items "
           "whose value is at least the threshold.", "", d("""
           def filter_dict_by_value(d, threshold):
               return {k: v for k, v in d.items() if v >= threshold}
           """), "assert filter_dict_by_value({'a': 1, 'b': 5, 'c': 3}, 3) == {'b': 5, 'c': 3}")
    yield ("Write a function `sort_dict_by_value(d)` that returns a list of (key, value) pairs sorted by value in "
           "descending order.", "", d("""
           def sort_dict_by_value(d):
               return sorted(d.items(), key=lambda item: item[1], reverse=True)
           """), "assert sort_dict_by_value({'a': 1, 'b': 3, 'c': 2}) == [('b', 3), ('c', 2), ('a', 1)]")
    yield ("Write a function `dict_from_lists(keys, values)` that builds a dictionary from a list of keys and a list "
           "of values of the same length.", "", d("""
           def dict_from_lists(keys, values):
               if len(keys) != len(values):
                   raise ValueError("keys and values must have the same length")
               return dict(zip(keys, values))
           """), "assert dict_from_lists(['a', 'b'], [1, 2]) == {'a': 1, 'b': 2}")
    yield ("Write a function `nested_get(data, path, default=None)` that follows a list of keys through nested "
           "dictionaries and returns the value found, or the default if any key is missing.", "", d("""
           def nested_get(data, path, default=None):
               current = data
               for key in path:
                   if not isinstance(current, dict) or key not in current:
                       return default
                   current = current[key]
               return current
           """), "assert nested_get({'a': {'b': {'c': 1}}}, ['a', 'b', 'c']) == 1\n"
                 "assert nested_get({'a': {}}, ['a', 'x'], 0) == 0")


def with_input():
    """Tasks whose Alpaca `input` carries the data, as in many real instruction sets."""
    cases = [
        ("Write Python code that computes the average of the given list of numbers and stores it in `result`.",
         "[4, 8, 15, 16, 23, 42]", "numbers = [4, 8, 15, 16, 23, 42]\nresult = sum(numbers) / len(numbers)\n",
         "assert result == 18.0"),
        ("Write Python code that reverses the order of words in the given sentence and stores it in `result`.",
         "the quick brown fox", "sentence = 'the quick brown fox'\nresult = ' '.join(reversed(sentence.split()))\n",
         "assert result == 'fox brown quick the'"),
        ("Write Python code that finds the longest word in the given sentence and stores it in `result`.",
         "lorapipe trains small language models", "sentence = 'lorapipe trains small language models'\n"
         "result = max(sentence.split(), key=len)\n", "assert result == 'lorapipe'"),
        ("Write Python code that removes duplicates from the given list while keeping the first occurrence order, "
         "and stores the list in `result`.", "[3, 1, 3, 2, 1, 5]",
         "items = [3, 1, 3, 2, 1, 5]\nresult = list(dict.fromkeys(items))\n", "assert result == [3, 1, 2, 5]"),
        ("Write Python code that counts how many times each character occurs in the given string and stores the "
         "dictionary in `result`.", "banana",
         "from collections import Counter\n\nresult = dict(Counter('banana'))\n",
         "assert result == {'b': 1, 'a': 3, 'n': 2}"),
        ("Write Python code that sorts the given list of names by length, then alphabetically, and stores it in "
         "`result`.", "['Zoe', 'Adam', 'Bob', 'Eve', 'Charlotte']",
         "names = ['Zoe', 'Adam', 'Bob', 'Eve', 'Charlotte']\nresult = sorted(names, key=lambda n: (len(n), n))\n",
         "assert result == ['Bob', 'Eve', 'Zoe', 'Adam', 'Charlotte']"),
        ("Write Python code that parses the given comma-separated line into a list of integers stored in `result`.",
         "10, 20,30 , 40", "line = '10, 20,30 , 40'\nresult = [int(part) for part in line.split(',')]\n",
         "assert result == [10, 20, 30, 40]"),
        ("Write Python code that builds a dictionary from the given 'key=value' pairs separated by semicolons and "
         "stores it in `result`.", "host=localhost;port=8000;debug=true",
         "text = 'host=localhost;port=8000;debug=true'\n"
         "result = dict(pair.split('=', 1) for pair in text.split(';'))\n",
         "assert result == {'host': 'localhost', 'port': '8000', 'debug': 'true'}"),
        ("Write Python code that computes the product of the given numbers and stores it in `result`.",
         "[2, 3, 7]", "import math\n\nresult = math.prod([2, 3, 7])\n", "assert result == 42"),
        ("Write Python code that extracts all the numbers from the given text as integers into a list `result`.",
         "Order 66 shipped 3 boxes in 2024", "import re\n\ntext = 'Order 66 shipped 3 boxes in 2024'\n"
         "result = [int(x) for x in re.findall(r'\\d+', text)]\n", "assert result == [66, 3, 2024]"),
        ("Write Python code that converts the given list of temperatures in Celsius to Fahrenheit and stores the "
         "list in `result`.", "[0, 37, 100]", "celsius = [0, 37, 100]\nresult = [c * 9 / 5 + 32 for c in celsius]\n",
         "assert [round(x, 1) for x in result] == [32.0, 98.6, 212.0]"),
        ("Write Python code that finds the indices of all occurrences of the letter 'a' in the given string and "
         "stores them in `result`.", "banana bread",
         "text = 'banana bread'\nresult = [i for i, ch in enumerate(text) if ch == 'a']\n",
         "assert result == [1, 3, 5, 10]"),
        ("Write Python code that transposes the given matrix (a list of rows) and stores it in `result`.",
         "[[1, 2, 3], [4, 5, 6]]", "matrix = [[1, 2, 3], [4, 5, 6]]\nresult = [list(row) for row in zip(*matrix)]\n",
         "assert result == [[1, 4], [2, 5], [3, 6]]"),
        ("Write Python code that keeps only the even numbers of the given list and squares them, storing the list "
         "in `result`.", "[1, 2, 3, 4, 5, 6]", "numbers = [1, 2, 3, 4, 5, 6]\nresult = [n * n for n in numbers if n % 2 == 0]\n",
         "assert result == [4, 16, 36]"),
        ("Write Python code that capitalises the first letter of every word in the given text and stores it in "
         "`result`.", "machine learning on one gpu",
         "text = 'machine learning on one gpu'\nresult = ' '.join(w[:1].upper() + w[1:] for w in text.split())\n",
         "assert result == 'Machine Learning On One Gpu'"),
        ("Write Python code that computes the running total of the given list and stores it in `result`.",
         "[5, 1, 4, 2]", "from itertools import accumulate\n\nresult = list(accumulate([5, 1, 4, 2]))\n",
         "assert result == [5, 6, 10, 12]"),
    ]
    yield from ((i, x, o, t) for i, x, o, t in cases)


FAMILIES = [sum_multiples, count_class, sequences, elementwise, conversions, geometry, string_filters, number_checks,
            dict_ops, with_input]


def list_reductions():
    reds = [
        ("largest_even", "the largest even number in a list, or None if there is none",
         "max((n for n in nums if n % 2 == 0), default=None)", "[3, 8, 5, 2]", "8", "[1, 3]", "None"),
        ("smallest_odd", "the smallest odd number in a list, or None if there is none",
         "min((n for n in nums if n % 2), default=None)", "[4, 9, 3, 7]", "3", "[2]", "None"),
        ("count_above_mean", "how many numbers in a list are strictly greater than the list's mean (0 for an empty list)",
         "sum(1 for n in nums if n > sum(nums) / len(nums)) if nums else 0", "[1, 2, 3, 10]", "1", "[]", "0"),
        ("range_of_values", "the difference between the largest and smallest number in a list (0 for an empty list)",
         "max(nums) - min(nums) if nums else 0", "[4, -2, 9]", "11", "[]", "0"),
        ("sum_of_negatives", "the sum of the negative numbers in a list", "sum(n for n in nums if n < 0)",
         "[-1, 5, -3]", "-4", "[2]", "0"),
        ("count_zeros", "how many zeros a list contains", "sum(1 for n in nums if n == 0)", "[0, 1, 0, 2]", "2",
         "[]", "0"),
        ("mean_of_positives", "the mean of the positive numbers in a list, or 0.0 if there are none",
         "(sum(p) / len(p)) if (p := [n for n in nums if n > 0]) else 0.0", "[2, -5, 4]", "3.0", "[-1]", "0.0"),
        ("alternating_sum", "the alternating sum nums[0] - nums[1] + nums[2] - ... of a list",
         "sum(n if i % 2 == 0 else -n for i, n in enumerate(nums))", "[5, 3, 2, 1]", "3", "[]", "0"),
        ("squares_sum_minus_sum_square", "the sum of the squares of a list minus the square of its sum",
         "sum(n * n for n in nums) - sum(nums) ** 2", "[1, 2, 3]", "-22", "[]", "0"),
        ("last_even_index", "the index of the last even number in a list, or -1 if there is none",
         "max((i for i, n in enumerate(nums) if n % 2 == 0), default=-1)", "[2, 3, 4, 5]", "2", "[1]", "-1"),
    ]
    for name, desc, expr, a, ra, b, rb in reds:
        yield (
            f"Write a Python function `{name}(nums)` that returns {desc}.",
            "",
            d(f"""
            def {name}(nums):
                return {expr}
            """),
            f"assert {name}({a}) == {ra}\nassert {name}({b}) == {rb}",
        )


def string_predicates():
    preds = [
        ("has_digit", "contains at least one decimal digit", "any(c.isdigit() for c in s)", "abc1", "abc"),
        ("is_all_vowels", "is non-empty and consists only of vowels (any case)",
         "bool(s) and all(c.lower() in 'aeiou' for c in s)", "AeIo", "aeb"),
        ("starts_and_ends_same", "is non-empty and starts and ends with the same character",
         "bool(s) and s[0] == s[-1]", "level", "python"),
        ("has_no_spaces", "contains no whitespace characters", "not any(c.isspace() for c in s)", "lorapipe",
         "lora pipe"),
        ("is_hex_string", "is a non-empty string of hexadecimal digits (0-9, a-f, A-F)",
         "bool(s) and all(c in '0123456789abcdefABCDEF' for c in s)", "1aF3", "12g"),
        ("has_balanced_quotes", "contains an even number of double-quote characters", "s.count('\"') % 2 == 0",
         'say "hi"', 'say "hi'),
    ]
    for name, desc, expr, yes, no in preds:
        yield (
            f"Write a Python function `{name}(s)` that returns True if the string {desc}, otherwise False.",
            "",
            d(f"""
            def {name}(s):
                return {expr}
            """),
            f"assert {name}({yes!r}) is True\nassert {name}({no!r}) is False",
        )


FAMILIES += [list_reductions, string_predicates]
