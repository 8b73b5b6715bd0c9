"""Work on the base model: loading it, generating, mixing adapters at run time and merging them in."""
