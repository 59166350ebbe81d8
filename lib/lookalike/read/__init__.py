"""What analysts read: the Catalog API, similarity search, the HTML report, text formatting."""
