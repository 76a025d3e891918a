"""What a run did, for people: the run summary, live progress, quicklook images."""
