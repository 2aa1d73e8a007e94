"""Model code: packed forwards only. Nothing here schedules, reads files or writes stores."""
