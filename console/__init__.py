"""The Textual operator console (arrives with the admin API issue)."""
