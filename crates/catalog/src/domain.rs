//! Validated values of the catalog domain and the product records built from
//! them. Each `parse` returns the reason a value is rejected, phrased for the
//! `BadRequest` field violation.

use std::collections::HashSet;

use agora_platform::money::Money;

/// The most characters a SKU may have.
pub const MAX_SKU_CHARS: usize = 64;
/// The most characters a product name may have (after trimming).
pub const MAX_NAME_CHARS: usize = 200;
/// The most characters a description may have (after trimming).
pub const MAX_DESCRIPTION_CHARS: usize = 5000;
/// The most characters one category slug may have.
pub const MAX_CATEGORY_CHARS: usize = 50;
/// The most distinct categories one product may be in.
pub const MAX_CATEGORIES: usize = 20;
/// The most characters a search query may have: a longer pattern only costs
/// more to match (and to extract trigrams from, on PostgreSQL), and nothing
/// longer than a name can be what a shopper types. There is no minimum: one-
/// and two-character queries match most products, so a search for them fills
/// its page after reading a few rows newest first (and the statement timeout
/// bounds the rare exception on PostgreSQL, see `crate::store`).
pub const MAX_QUERY_CHARS: usize = 200;

/// A stock keeping unit: 1 to 64 characters of `[A-Za-z0-9._-]`, surrounding
/// whitespace trimmed. Letter case is kept and significant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sku(String);

impl Sku {
    /// Validates a SKU.
    pub fn parse(raw: &str) -> Result<Self, &'static str> {
        let sku = raw.trim();
        if sku.is_empty() {
            return Err("must not be empty");
        }
        if sku.chars().count() > MAX_SKU_CHARS {
            return Err("must be at most 64 characters");
        }
        if !sku
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            return Err("must contain only letters, digits, '.', '_' and '-'");
        }
        Ok(Self(sku.to_owned()))
    }

    /// The SKU.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A product name: trimmed, 1 to 200 characters, no control characters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProductName(String);

impl ProductName {
    /// Validates a name.
    pub fn parse(raw: &str) -> Result<Self, &'static str> {
        let name = raw.trim();
        if name.is_empty() {
            return Err("must not be empty");
        }
        if name.chars().count() > MAX_NAME_CHARS {
            return Err("must be at most 200 characters");
        }
        if name.chars().any(char::is_control) {
            return Err("must not contain control characters");
        }
        Ok(Self(name.to_owned()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A product description: trimmed, at most 5000 characters, possibly empty.
/// Line breaks and tabs are allowed; other control characters are not (NUL
/// cannot even be stored in a PostgreSQL `TEXT`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Description(String);

impl Description {
    /// Validates a description.
    pub fn parse(raw: &str) -> Result<Self, &'static str> {
        let description = raw.trim();
        if description.chars().count() > MAX_DESCRIPTION_CHARS {
            return Err("must be at most 5000 characters");
        }
        if description
            .chars()
            .any(|c| c.is_control() && !matches!(c, '\n' | '\r' | '\t'))
        {
            return Err("must not contain control characters other than line breaks and tabs");
        }
        Ok(Self(description.to_owned()))
    }

    /// The description.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A category slug such as `books`: 1 to 50 characters of `[a-z0-9-]`.
/// Upper case is rejected rather than folded, so that a slug is written one
/// way everywhere (links, filters, stored rows).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Category(String);

impl Category {
    /// Validates a slug.
    pub fn parse(raw: &str) -> Result<Self, &'static str> {
        if raw.is_empty() {
            return Err("must not be empty");
        }
        if raw.chars().count() > MAX_CATEGORY_CHARS {
            return Err("must be at most 50 characters");
        }
        if !raw
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err("must be a lowercase slug of a-z, 0-9 and '-'");
        }
        Ok(Self(raw.to_owned()))
    }

    /// The slug.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A product's categories: at most 20 distinct slugs, in the order first given.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Categories(Vec<Category>);

/// Why a list of categories was rejected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CategoriesError {
    /// More than [`MAX_CATEGORIES`] distinct entries; entries were not checked
    /// one by one, so a huge list cannot produce a huge error.
    TooMany,
    /// These entries (index in the request, reason) are not valid slugs.
    Invalid(Vec<(usize, &'static str)>),
}

impl Categories {
    /// Validates a list: duplicates are removed (the first occurrence keeps its
    /// place), then at most 20 may remain and each must be a valid slug.
    pub fn parse(raw: &[String]) -> Result<Self, CategoriesError> {
        let mut seen = HashSet::new();
        let distinct: Vec<(usize, &String)> = raw
            .iter()
            .enumerate()
            .filter(|(_, slug)| seen.insert(slug.as_str()))
            .collect();
        if distinct.len() > MAX_CATEGORIES {
            return Err(CategoriesError::TooMany);
        }
        let mut categories = Vec::with_capacity(distinct.len());
        let mut invalid = Vec::new();
        for (index, slug) in distinct {
            match Category::parse(slug) {
                Ok(category) => categories.push(category),
                Err(reason) => invalid.push((index, reason)),
            }
        }
        if invalid.is_empty() {
            Ok(Self(categories))
        } else {
            Err(CategoriesError::Invalid(invalid))
        }
    }

    /// The slugs, in order.
    pub fn as_slice(&self) -> &[Category] {
        &self.0
    }

    /// The slugs as strings, in order.
    pub fn to_strings(&self) -> Vec<String> {
        self.0.iter().map(|c| c.0.clone()).collect()
    }
}

/// A search text for `ListProducts`: trimmed and lower-cased, at most 200
/// characters, no control characters. Empty means "no text filter".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SearchQuery(String);

impl SearchQuery {
    /// Validates a query; `None` when it is empty (match everything).
    pub fn parse(raw: &str) -> Result<Option<Self>, &'static str> {
        let query = raw.trim();
        if query.is_empty() {
            return Ok(None);
        }
        if query.chars().count() > MAX_QUERY_CHARS {
            return Err("must be at most 200 characters");
        }
        if query.chars().any(char::is_control) {
            return Err("must not contain control characters");
        }
        Ok(Some(Self(query.to_lowercase())))
    }

    /// A `LIKE` pattern matching any text that contains the query, with the
    /// pattern's own special characters escaped (use with `ESCAPE '\'`).
    pub fn like_pattern(&self) -> String {
        let mut pattern = String::with_capacity(self.0.len() + 2);
        pattern.push('%');
        for c in self.0.chars() {
            if matches!(c, '%' | '_' | '\\') {
                pattern.push('\\');
            }
            pattern.push(c);
        }
        pattern.push('%');
        pattern
    }
}

/// The text a product is searched by: its name and description lower-cased
/// here, in Rust, rather than with SQL `LOWER()`, which on SQLite folds only
/// ASCII and so would make the two backends answer differently. The unit
/// separator between them cannot occur in either part nor in a query, so no
/// match spans the boundary.
pub fn search_text(name: &str, description: &str) -> String {
    format!(
        "{}\u{1f}{}",
        name.to_lowercase(),
        description.to_lowercase()
    )
}

/// A product as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Product {
    /// UUIDv7, assigned at creation.
    pub id: String,
    /// Unique stock keeping unit.
    pub sku: String,
    /// Display name.
    pub name: String,
    /// Free text, possibly empty.
    pub description: String,
    /// Price per unit.
    pub price: Money,
    /// Category slugs, in the order they were given.
    pub categories: Vec<String>,
    /// Creation time, microseconds since the epoch; never changes, so it is a
    /// stable sort key for pagination.
    pub created_at: i64,
    /// Time of the last change, microseconds since the epoch.
    pub updated_at: i64,
}

/// A validated product to create.
#[derive(Clone, Debug)]
pub struct NewProduct {
    /// Unique stock keeping unit.
    pub sku: Sku,
    /// Display name.
    pub name: ProductName,
    /// Free text, possibly empty.
    pub description: Description,
    /// Price per unit.
    pub price: Money,
    /// Category slugs.
    pub categories: Categories,
}

/// The validated fields an update sets; `None` leaves a field as it is.
#[derive(Clone, Debug, Default)]
pub struct ProductChanges {
    /// A new name.
    pub name: Option<ProductName>,
    /// A new description.
    pub description: Option<Description>,
    /// A new price.
    pub price: Option<Money>,
    /// A new list of categories (replacing the old one).
    pub categories: Option<Categories>,
}

impl ProductChanges {
    /// `product` with these changes applied; timestamps are left alone.
    pub fn apply_to(&self, product: &Product) -> Product {
        let mut next = product.clone();
        if let Some(name) = &self.name {
            next.name = name.as_str().to_owned();
        }
        if let Some(description) = &self.description {
            next.description = description.as_str().to_owned();
        }
        if let Some(price) = &self.price {
            next.price = price.clone();
        }
        if let Some(categories) = &self.categories {
            next.categories = categories.to_strings();
        }
        next
    }
}

/// A price before and after an update that changed it: what a
/// `ProductPriceChanged` event reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PriceChange {
    /// The price before the update.
    pub old: Money,
    /// The price after the update.
    pub new: Money,
}

/// The outcome of an update.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpdatedProduct {
    /// The product after the update.
    pub product: Product,
    /// Set when the update changed the price (currency or amount).
    pub price_change: Option<PriceChange>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skus_are_trimmed_and_limited_to_their_alphabet() {
        assert_eq!(
            Sku::parse(" BOOK-rust_1.0 ").map(|s| s.0),
            Ok("BOOK-rust_1.0".to_owned())
        );
        assert!(Sku::parse(&"A".repeat(64)).is_ok());
        for bad in ["", "   ", "a b", "a/b", "ä", "a\u{0}", "a;DROP"] {
            assert!(Sku::parse(bad).is_err(), "{bad:?} should be rejected");
        }
        assert!(Sku::parse(&"A".repeat(65)).is_err());
    }

    #[test]
    fn names_are_trimmed_bounded_and_free_of_control_characters() {
        assert_eq!(
            ProductName::parse("  Ferris Mug ").map(|n| n.0),
            Ok("Ferris Mug".to_owned())
        );
        assert!(ProductName::parse(&"é".repeat(200)).is_ok());
        assert!(ProductName::parse(&"é".repeat(201)).is_err());
        assert!(ProductName::parse(" \t ").is_err());
        assert!(ProductName::parse("Mug\nTwo").is_err());
        assert!(ProductName::parse("Mug\u{0}").is_err());
    }

    #[test]
    fn descriptions_may_be_empty_and_have_line_breaks() {
        assert_eq!(Description::parse("  ").map(|d| d.0), Ok(String::new()));
        assert!(Description::parse("Line one\nLine two\r\n\tindented").is_ok());
        assert!(Description::parse(&"x".repeat(5000)).is_ok());
        assert!(Description::parse(&"x".repeat(5001)).is_err());
        assert!(Description::parse("nul \u{0} byte").is_err());
        assert!(Description::parse("bell \u{7}").is_err());
    }

    #[test]
    fn categories_are_lowercase_slugs() {
        assert!(Category::parse("distributed-systems").is_ok());
        assert!(Category::parse("3d-printing").is_ok());
        assert!(Category::parse(&"a".repeat(50)).is_ok());
        for bad in ["", "Books", "books ", "bücher", "a_b", "a.b"] {
            assert!(Category::parse(bad).is_err(), "{bad:?} should be rejected");
        }
        assert!(Category::parse(&"a".repeat(51)).is_err());
    }

    #[test]
    fn category_lists_drop_duplicates_keep_order_and_are_bounded() {
        let raw: Vec<String> = ["merch", "books", "merch", "art", "books"]
            .map(String::from)
            .to_vec();
        let parsed = Categories::parse(&raw).expect("valid");
        assert_eq!(parsed.to_strings(), ["merch", "books", "art"]);

        let twenty: Vec<String> = (0..20).map(|i| format!("c{i}")).collect();
        assert!(Categories::parse(&twenty).is_ok());
        let mut twenty_with_repeats = twenty.clone();
        twenty_with_repeats.extend(twenty.iter().cloned());
        assert!(Categories::parse(&twenty_with_repeats).is_ok());
        let twenty_one: Vec<String> = (0..21).map(|i| format!("c{i}")).collect();
        assert_eq!(
            Categories::parse(&twenty_one),
            Err(CategoriesError::TooMany)
        );

        let raw: Vec<String> = ["ok", "Bad", "ok", "also bad"].map(String::from).to_vec();
        match Categories::parse(&raw) {
            Err(CategoriesError::Invalid(bad)) => {
                let indexes: Vec<usize> = bad.iter().map(|(i, _)| *i).collect();
                assert_eq!(indexes, [1, 3]);
            }
            other => panic!("expected invalid entries, got {other:?}"),
        }
    }

    #[test]
    fn queries_are_lowercased_and_escaped_for_like() {
        assert_eq!(SearchQuery::parse("   "), Ok(None));
        let query = SearchQuery::parse(" 100%_Ök\\ ")
            .ok()
            .flatten()
            .expect("query");
        assert_eq!(query.like_pattern(), "%100\\%\\_ök\\\\%");
        assert!(SearchQuery::parse(&"q".repeat(201)).is_err());
        assert!(SearchQuery::parse("a\u{1f}b").is_err());
        assert!(SearchQuery::parse("a\u{0}b").is_err());
    }

    #[test]
    fn search_text_folds_unicode_case() {
        assert_eq!(search_text("Ärger", "ÉTÉ"), "ärger\u{1f}été");
    }

    #[test]
    fn changes_touch_only_what_they_set() {
        let product = Product {
            id: "p".into(),
            sku: "S".into(),
            name: "Old".into(),
            description: "Text".into(),
            price: Money {
                currency_code: "EUR".into(),
                amount_minor: 100,
            },
            categories: vec!["a".into()],
            created_at: 1,
            updated_at: 1,
        };
        let changes = ProductChanges {
            name: ProductName::parse("New").ok(),
            ..ProductChanges::default()
        };
        let next = changes.apply_to(&product);
        assert_eq!(next.name, "New");
        assert_eq!(
            (next.description, next.price, next.categories),
            (product.description, product.price, product.categories)
        );
    }
}
