"""English TN tables: currencies, units, months and symbols, as the words ChatTTS should say."""
from __future__ import annotations

# symbol or code → (singular, plural, minor singular, minor plural); no minor unit → decimal reading
CURRENCIES = {
    "$": ("dollar", "dollars", "cent", "cents"),
    "US$": ("US dollar", "US dollars", "cent", "cents"),
    "€": ("euro", "euros", "cent", "cents"),
    "£": ("pound", "pounds", "penny", "pence"),
    "¥": ("yuan", "yuan", None, None),
    "₹": ("rupee", "rupees", "paisa", "paise"),
    "₩": ("won", "won", None, None),
    "USD": ("US dollar", "US dollars", "cent", "cents"),
    "EUR": ("euro", "euros", "cent", "cents"),
    "GBP": ("pound", "pounds", "penny", "pence"),
    "CNY": ("yuan", "yuan", None, None),
    "RMB": ("yuan", "yuan", None, None),
    "JPY": ("yen", "yen", None, None),
}
SCALES = {"k": "thousand", "K": "thousand", "m": "million", "M": "million", "b": "billion",
           "B": "billion", "bn": "billion", "Bn": "billion", "BN": "billion"}

# abbreviation → (singular, plural). "Loose" units may follow a space; "tight" ones ("5m", "3h")
# are common words or letters too, so they count only when glued to the number.
LOOSE_UNITS = {
    "°C": ("degree Celsius", "degrees Celsius"), "℃": ("degree Celsius", "degrees Celsius"),
    "°F": ("degree Fahrenheit", "degrees Fahrenheit"),
    "℉": ("degree Fahrenheit", "degrees Fahrenheit"), "°": ("degree", "degrees"),
    "km/h": ("kilometer per hour", "kilometers per hour"),
    "kph": ("kilometer per hour", "kilometers per hour"),
    "mph": ("mile per hour", "miles per hour"), "m/s": ("meter per second", "meters per second"),
    "km": ("kilometer", "kilometers"), "cm": ("centimeter", "centimeters"),
    "mm": ("millimeter", "millimeters"), "mi": ("mile", "miles"), "ft": ("foot", "feet"),
    "kg": ("kilogram", "kilograms"), "mg": ("milligram", "milligrams"),
    "lb": ("pound", "pounds"), "lbs": ("pound", "pounds"), "oz": ("ounce", "ounces"),
    "ml": ("milliliter", "milliliters"), "mL": ("milliliter", "milliliters"),
    "KB": ("kilobyte", "kilobytes"), "MB": ("megabyte", "megabytes"),
    "GB": ("gigabyte", "gigabytes"), "TB": ("terabyte", "terabytes"),
    "Hz": ("hertz", "hertz"), "kHz": ("kilohertz", "kilohertz"),
    "MHz": ("megahertz", "megahertz"), "GHz": ("gigahertz", "gigahertz"),
    "kW": ("kilowatt", "kilowatts"), "kWh": ("kilowatt hour", "kilowatt hours"),
    "mAh": ("milliamp hour", "milliamp hours"), "ms": ("millisecond", "milliseconds"),
    "sec": ("second", "seconds"), "min": ("minute", "minutes"), "hr": ("hour", "hours"),
    "hrs": ("hour", "hours"),
}
TIGHT_UNITS = {
    "m": ("meter", "meters"), "g": ("gram", "grams"), "l": ("liter", "liters"),
    "L": ("liter", "liters"), "s": ("second", "seconds"), "h": ("hour", "hours"),
    "in": ("inch", "inches"), "W": ("watt", "watts"), "V": ("volt", "volts"),
    "x": ("times", "times"),
}

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
           "October", "November", "December"]
MONTH_RE = (r"Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?"
             r"|Sep(?:t(?:ember)?)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?")

SYMBOLS = {"&": "and", "+": "plus", "=": "equals", "@": "at", "%": "percent", "×": "times",
            "÷": "divided by", "°": "degrees", "#": "number", "~": "about", "≈": "about"}

FRACTION_DENOMINATORS = {2: ("half", "halves"), 4: ("quarter", "quarters")}
