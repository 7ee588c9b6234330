"""The dispatcher: who hears about an event, on which channel types, saying what."""
