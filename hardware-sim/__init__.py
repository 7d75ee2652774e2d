"""fieldtwin hardware simulator: plant physics served over real device protocols."""
